# Quick start:  make run   ·   make test
VENV ?= .venv
PROMPT ?= Why is the sky blue?

.PHONY: install install-test run test bench clean

install:
	scripts/install.sh

# the converter's and the training loop's tests need the [train] extra (torch==2.13.0 CPU,
# transformers, peft); the lm-evaluation-harness adapter's tests need [eval]; the cluster tests [ray]
install-test:
	scripts/install.sh test,train,eval,ray

run: install
	$(VENV)/bin/edge-fslm run "$(PROMPT)"

# pytest exits 5 when it collects no tests; that is not a pass, but not a crash either.
test: install-test
	$(VENV)/bin/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

bench: install
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
