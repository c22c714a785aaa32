"""The newcomer's tools: JupyterLab as `tools/book.sh lab` starts it, the chapter runner's failure
handling, and committed outputs free of this machine's paths and of warnings."""
import importlib.util
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))


def load_book_tool():
    spec = importlib.util.spec_from_file_location("book_tool", ROOT / "tools" / "book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def test_lab_lists_and_opens_every_chapter(tmp_path):
    """JupyterLab, started exactly as `tools/book.sh lab` starts it (as whichever user runs the tests,
    root included), serves chapters/ with one entry per chapter, opens each notebook, offers the
    `rlscratch` kernel the notebooks ask for, and stops."""
    book = load_book_tool()
    server_log = tmp_path / "lab.log"
    with open(server_log, "w") as log:
        process, port, token = book.start_lab(stdout=log, stderr=subprocess.STDOUT)
    try:
        assert book.wait_for_lab(process, port, token), "JupyterLab did not start:\n" + server_log.read_text()[-3000:]
        listing = get_json(book.lab_url(port, token, "api/contents/chapters"))
        assert listing["type"] == "directory"
        entries = {item["name"]: item["type"] for item in listing["content"]}
        notebooks = {name for name, kind in entries.items() if kind == "notebook"}
        assert notebooks == {nb.name for nb in NOTEBOOKS}
        assert entries.get("scripts") == "directory"  # the paired scripts live apart from the notebooks
        assert not [name for name in entries if name.endswith(".py")]
        for name in sorted(notebooks):
            model = get_json(book.lab_url(port, token, f"api/contents/chapters/{name}"))
            assert model["type"] == "notebook" and model["content"]["cells"], name
            assert model["content"]["metadata"]["kernelspec"]["name"] == "rlscratch", name
        kernels = get_json(book.lab_url(port, token, "api/kernelspecs"))["kernelspecs"]
        assert "rlscratch" in kernels, "the notebooks' kernel is missing: run tools/setup.sh"
    finally:
        book.stop_lab(process, port, token)
    assert process.returncode is not None


def write_notebook(path: Path, *sources: str) -> None:
    nbformat.write(new_notebook(cells=[new_markdown_cell("# a test chapter")] + [new_code_cell(s) for s in sources]),
                   path)


def test_a_failing_chapter_does_not_stop_the_book(tmp_path):
    first, failing, last = tmp_path / "01_first.ipynb", tmp_path / "02_fails.ipynb", tmp_path / "03_last.ipynb"
    write_notebook(first, "print('first chapter ran')")
    write_notebook(failing, "x = 1", "raise ValueError('this chapter fails in its second cell')", "print('not reached')")
    write_notebook(last, "print('last chapter ran')")
    failing_before = failing.read_bytes()
    logs = tmp_path / "logs"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "book.py"), "run", str(first), str(failing), str(last),
                          "--log-dir", str(logs)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "\x1b" not in out  # readable without a terminal: no colour codes
    # the report names the chapter, the cell and the error in a few lines
    assert "FAILED 02_fails at cell 2/3" in out and "ValueError: this chapter fails in its second cell" in out
    # the chapters around it ran, their outputs saved in place; the failing notebook is left as it was
    for path, text in ((first, "first chapter ran"), (last, "last chapter ran")):
        outputs = nbformat.read(path, as_version=4).cells[1].outputs
        assert outputs and text in outputs[0]["text"], path.name
    assert failing.read_bytes() == failing_before
    # the summary table names every chapter with its status, and the log has the whole traceback
    summary = out[out.rindex("chapter  "):]
    assert re.search(r"^01_first\s+ok\b", summary, re.M)
    assert re.search(r"^02_fails\s+FAILED\b.*ValueError", summary, re.M)
    assert re.search(r"^03_last\s+ok\b", summary, re.M)
    log = (logs / "02_fails.log").read_text()
    assert "Traceback" in log and "raise ValueError" in log and "\x1b" not in log


MACHINE_PATH = re.compile(r"/root/|/home/|/Users/|/work/|/tmp/|/var/folders/|site-packages|dist-packages|[A-Z]:\\\\")
WARNING = re.compile(r"\b[A-Z]\w*Warning\b")


def output_texts(nb_path: Path):
    """(execution count, text) of every text in the stored outputs of a notebook."""
    for cell in json.loads(nb_path.read_text())["cells"]:
        for output in cell.get("outputs", []):
            texts = ["".join(output.get("text", "")), "\n".join(output.get("traceback", []))]
            for mime, data in output.get("data", {}).items():
                if mime.startswith("text/"):
                    texts.append("".join(data) if isinstance(data, list) else str(data))
            for text in texts:
                if text:
                    yield cell.get("execution_count"), text


def test_no_machine_paths_in_committed_outputs():
    """Stored outputs must not show where the book was run (home folders, temp folders, site-packages)."""
    found = [f"{nb.name} [{count}]: ...{text[max(0, m.start() - 60):m.end() + 40]!r}..."
             for nb in NOTEBOOKS for count, text in output_texts(nb) for m in MACHINE_PATH.finditer(text)]
    assert not found, "\n".join(found)


def test_no_warnings_in_committed_outputs():
    found = [f"{nb.name} [{count}]: {text[max(0, m.start() - 60):m.end() + 80]!r}"
             for nb in NOTEBOOKS for count, text in output_texts(nb) for m in WARNING.finditer(text)]
    assert not found, "\n".join(found)
