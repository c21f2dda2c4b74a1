# The two commands of the README:
#   make run    set up .venv and run the main job on the sample dataset (local Spark, packaged members)
#   make test   set up .venv (and the separate Airflow env) and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= output/sample
METHOD ?= deepen
MEMBERS ?= smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m
ARGS ?=

.PHONY: setup setup-airflow run test test-fast bench clean

setup:
	bash scripts/setup.sh

setup-airflow: setup
	bash scripts/setup_airflow.sh

run: setup
	$(VENV)/bin/ensemble-fuse --input data/sample.jsonl --output $(OUT) --method $(METHOD) --members $(MEMBERS) $(ARGS)

test: setup setup-airflow
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf output spark-warehouse
