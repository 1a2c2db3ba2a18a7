"""A simulated vLLM server: vLLM's OpenAI API and metrics over a timing model.

Run `python -m simulator --help` with `bench/` on `PYTHONPATH` (and
`PYTHONSAFEPATH=1`). The model is described in MODEL.md beside this file.
"""
