"""poproxy: a TLS-terminating POP3 proxy in front of plaintext POP3 backends."""

__version__ = "0.1.0"
