# poproxy developer commands. `make test` does every set-up step itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# POP3 servers of the interop matrix that conflict with dovecot-pop3d (Conflicts: pop3-server)
# or would start a daemon on port 110: unpacked here, never installed (tools/interop_debs.py).
INTEROP_DEBS := build/interop/debs
INTEROP_UNPACKED := popa3d courier-pop cyrus-common cyrus-pop3d mailutils-pop3d

.PHONY: install demo check test interop-deps interop bench-deps bench clean

$(STAMP): pyproject.toml
	@# Debian's python3 ships venv separately: install it when root and missing.
	@if ! $(PYTHON) -m venv --help >/dev/null 2>&1 || ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
		fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/poproxy demo -c config/demo.yaml

check: install
	$(BIN)/ruff format --check poproxy tests bench
	$(BIN)/ruff check poproxy tests bench
	$(BIN)/mypy

# The interop tests run a real Dovecot and real clients (curl, openssl).
# As root on a Debian-like machine they are installed here when missing.
interop-deps:
	@missing=""; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-pop3d"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v fail2ban-regex >/dev/null || missing="$$missing fail2ban"; \
	command -v fetchmail >/dev/null || missing="$$missing fetchmail"; \
	command -v getmail >/dev/null || missing="$$missing getmail6"; \
	command -v mutt >/dev/null || missing="$$missing mutt"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "missing:$$missing (not root: interop tests that need them will be skipped)"; \
		fi; \
	fi
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		$(PYTHON) tools/interop_debs.py $(INTEROP_DEBS) $(INTEROP_UNPACKED); \
	else \
		echo "not root: $(INTEROP_UNPACKED) not unpacked (their interop tests will be skipped)"; \
	fi

test: check interop-deps
	$(BIN)/pytest

# The interop matrix alone: real clients x real POP3 servers through poproxy. Regenerates
# docs/interop.md from its results (build/interop/matrix-results.json), failures included.
interop: install interop-deps
	$(BIN)/pytest tests/interop/matrix; status=$$?; \
	$(BIN)/python tools/interop_report.py || status=1; exit $$status

# Benchmark against nginx (mail), HAProxy and stunnel: bench/README.md. Not part of `make test`.
BENCH_ARGS ?= --quick

bench-deps: install
	@missing=""; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || missing="$$missing libnginx-mod-mail"; \
	[ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	[ -x /usr/bin/stunnel4 ] || missing="$$missing stunnel4"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "missing:$$missing (not root: the benchmark leaves those systems out)"; \
		fi; \
	fi
	@[ -x $(BIN)/py-spy ] || $(BIN)/pip install --quiet py-spy

bench: bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
