"""The interoperability matrix: real mail clients, through poproxy, to real POP3 servers."""
