"""rlscratch: the package built by the chapters of "Building a Reasoning LLM from Scratch".

Most modules here are generated from the chapter notebooks by `python tools/export.py`:
model, generate, results (chapter 01). Import the submodules directly, e.g.
`from rlscratch.generate import generate`.
"""

__version__ = "0.1.0"
