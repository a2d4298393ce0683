# The two set-up commands of the README. Each creates .venv if missing and installs
# everything it needs, Debian packages included.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv system-deps label-studio

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Headless Chromium renders the HTML report in its test. Installed only when
# missing and when we can (root with apt-get); the test says why it skipped otherwise.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and not root: the HTML render test will skip"; fi; }

demo: $(STAMP)
	$(BIN)/label-audit run configs/imagenet_real.yaml

# Label Studio (the labelling server of `label-audit tasks push/pull`) pins Django,
# pandas and protobuf versions that conflict with the project's, so it lives in a
# virtual environment of its own; the project talks to it over HTTP only.
LABEL_STUDIO_VENV := .venv-label-studio
LABEL_STUDIO_VERSION := 1.23.2
LABEL_STUDIO_STAMP := $(LABEL_STUDIO_VENV)/.installed-$(LABEL_STUDIO_VERSION)

$(LABEL_STUDIO_STAMP):
	test -x $(LABEL_STUDIO_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(LABEL_STUDIO_VENV)/bin/python -m pip install -q 'label-studio==$(LABEL_STUDIO_VERSION)'
	touch $(LABEL_STUDIO_STAMP)

label-studio: $(LABEL_STUDIO_STAMP)

test: $(STAMP) system-deps $(LABEL_STUDIO_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
