"""The benchmarks behind `python scripts/benchmark.py` and `python scripts/benchmark_full_size.py`.

A development folder next to `scripts/` (not part of the wheel). `scripts/benchmark.py`'s docstring says what it
measures; here, one module a job:

- `config`: the command's `Args` and constants; `layout`: pi0's experts and the LLM layers' params layout;
- `timing`: times and peak extra memory, shared by every section;
- `inputs`, `device_ops`, `floor`, `naive`, `kernel_profile`: the pieces of section `merge` (`merge`);
- one module per other section: `peft_merge`, `save`, `serving`, `train`, `cli`;
- `child` (a section in a fresh process), `machine` (the machine and its load), `main` (every section, then the
  markdown);
- `report/`: the markdown, one module per table (`page` puts them together; `cells` formats figures);
- `full_size`: the full-size checkpoint benchmark (`scripts/benchmark_full_size.py`).
"""
