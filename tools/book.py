"""Run the book's chapters with progress on the console, or open them in JupyterLab.

    python tools/book.py run [CHAPTER ...]   # every chapter (or those named: 01, 02_evaluation, a path)
    python tools/book.py lab [--port N]      # JupyterLab on 127.0.0.1, opened on chapters/

`bash tools/book.sh` calls this after setting up the environment. Each chapter runs top to bottom in
a fresh kernel of this Python, with one line per code cell (number, time, first line); a chapter
that fails is reported in a few lines, its full traceback saved under logs/book/, its notebook left
as it was, and the next chapter runs. A summary table ends the run; the exit status is 1 if any
chapter failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
LOG_DIR = ROOT / "logs" / "book"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEARTBEAT_S = 60  # without a terminal, a long cell reports that it is still running this often
INTERRUPTED = threading.Event()  # Ctrl-C (or SIGTERM): stop the whole run, not just this chapter


def _on_sigint(signum, frame):
    INTERRUPTED.set()
    signal.default_int_handler(signum, frame)


def duration(seconds: float) -> str:
    """A short human duration: 0.4 s, 42 s, 3m05s, 1h02m."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def shown_path(path: Path) -> str:
    """`path` relative to the repository (or the working directory) when it lies there."""
    for base in (ROOT, Path.cwd()):
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            pass
    return str(path)


def first_line(source: str, width: int = 60) -> str:
    """The first meaningful line of a cell's source, shortened to `width` characters."""
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#") or line.startswith("#| export"):
            return line if len(line) <= width else line[: width - 3] + "..."
    return ""


def last_output_line(cell) -> str:
    """The last line a running cell printed (progress bars included), or ''."""
    for output in reversed(list(cell.get("outputs", []))):
        if output.get("output_type") == "stream":
            lines = [x.strip() for x in re.split(r"[\r\n]", ANSI.sub("", output.get("text", ""))) if x.strip()]
            if lines:
                return lines[-1][:70]
    return ""


# --------------------------------------------------------------------------------------- running chapters


@dataclass
class Result:
    """How one chapter ended."""

    name: str
    status: str = "not run"  # ok | FAILED | interrupted | not run
    seconds: float = 0.0
    error: str = ""  # one line: where and what
    log: Path | None = None


@dataclass
class Progress:
    """Console lines for one chapter's cells; a ticker shows the running cell's elapsed time."""

    name: str
    n_code: int
    tty: bool = field(default_factory=lambda: sys.stdout.isatty())
    start: float = field(default_factory=time.monotonic)
    number: int = 0  # code cells started so far (In [number])
    cell: object = None  # the running cell, None between cells
    last_cell: object = None  # the cell started last (the failing one, after an error)
    cell_start: float = 0.0
    cell_index: int = -1
    _width: int = 0  # longest live line so far (a terminal line is overwritten in place)
    _stale_outputs: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def label(self) -> str:
        return f"  [{self.number:>{len(str(self.n_code))}}/{self.n_code}]"

    def cell_started(self, cell, cell_index: int, **_) -> None:
        with self._lock:
            self.number += 1
            self.cell, self.cell_index, self.cell_start = cell, cell_index, time.monotonic()
            self.last_cell = cell
            self._stale_outputs = cell.get("outputs")  # the stored run's, until the kernel starts on this cell
            if self.tty:
                self._write_live()

    def cell_finished(self, cell, execute_reply=None, **_) -> None:
        with self._lock:
            now = time.monotonic()
            line = (f"{self.label()} {duration(now - self.cell_start):>8}  (chapter {duration(now - self.start):>6})  "
                    f"{first_line(cell.source)}")
            if (execute_reply or {}).get("content", {}).get("status") == "error":
                line += "  <- error"
            if self.tty:
                line = "\r" + line[: shutil.get_terminal_size().columns - 1].ljust(self._width)
            print(line, flush=True)
            self.cell = None

    def _write_live(self) -> None:
        now = time.monotonic()
        line = (f"{self.label()} {duration(now - self.cell_start):>8}  (chapter {duration(now - self.start):>6})  "
                f"{first_line(self.cell.source)}")
        tail = last_output_line(self.cell) if self.cell.get("outputs") is not self._stale_outputs else ""
        if tail:
            line += f"  | {tail}"
        columns = shutil.get_terminal_size().columns - 1
        line = line[:columns]
        self._width = min(max(self._width, len(line)), columns)
        sys.stdout.write("\r" + line.ljust(self._width))
        sys.stdout.flush()

    def tick(self) -> None:
        """Run in a thread: refresh the live line every second (terminal) or print a heartbeat."""
        last_beat = time.monotonic()
        while not self._stop.wait(1.0):
            with self._lock:
                if self.cell is None:
                    continue
                if self.tty:
                    self._write_live()
                elif time.monotonic() - last_beat >= HEARTBEAT_S and time.monotonic() - self.cell_start >= HEARTBEAT_S:
                    last_beat = time.monotonic()
                    fresh = self.cell.get("outputs") is not self._stale_outputs
                    tail = last_output_line(self.cell) if fresh else ""
                    print(f"{self.label()} still running after {duration(time.monotonic() - self.cell_start)}"
                          + (f"  | {tail}" if tail else ""), flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self.tty and self.cell is not None:
            print(flush=True)


def _kernel_manager():
    """A kernel manager whose every kernel is this Python (the book's environment), whatever the
    notebook's kernelspec says: the same rule as the tests' `--nbval-current-env`."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict())

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def _in_chapters(nb_path: Path) -> bool:
    return nb_path.resolve().parent == CHAPTERS.resolve()


def _export() -> subprocess.CompletedProcess:
    """`python tools/export.py`: the package regenerated from the notebooks."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export.py")], cwd=ROOT, capture_output=True, text=True)


def run_chapter(nb_path: Path, log_dir: Path) -> Result:
    """Execute one notebook top to bottom; save it in place (and sync its paired script) if it passes."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    result = Result(nb_path.stem)
    log = log_dir / f"{nb_path.stem}.log"
    start = time.monotonic()
    if _in_chapters(nb_path):  # the package must match the notebooks before a chapter imports it
        exported = _export()
        if exported.returncode != 0:
            return _step_failed(result, "tools/export.py", exported, log, nb_path, start)

    nb = nbformat.read(nb_path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    print(f"{nb_path.stem}: {len(code_cells)} code cell{'s' if len(code_cells) != 1 else ''}", flush=True)
    progress = Progress(nb_path.stem, len(code_cells))
    client = NotebookClient(nb, km=_kernel_manager(), timeout=None, record_timing=True,
                            resources={"metadata": {"path": str(nb_path.parent)}},
                            on_cell_execute=progress.cell_started, on_cell_executed=progress.cell_finished)
    ticker = threading.Thread(target=progress.tick, daemon=True)
    ticker.start()
    log_dir.mkdir(parents=True, exist_ok=True)
    kernel_log = log_dir / f"{nb_path.stem}.kernel.log"  # what the kernel process itself writes (C libraries, warnings)
    try:
        with open(kernel_log, "w") as kernel_stderr:
            client.execute(stderr=kernel_stderr)
    except KeyboardInterrupt:
        progress.stop()
        result.status, result.seconds = "interrupted", time.monotonic() - start
        result.error = f"interrupted in cell {progress.number}"
        return result
    except Exception as err:  # a cell raised, or the kernel died: report, keep the notebook as it was
        progress.stop()
        # While it executes, nbclient takes SIGINT/SIGTERM itself: it shuts the kernel down (and we
        # then see "kernel died"), leaving a note of it on the client.
        if getattr(client, "_async_cleanup_kernel_future", None) is not None:
            INTERRUPTED.set()
        if INTERRUPTED.is_set():
            result.status, result.seconds = "interrupted", time.monotonic() - start
            result.error = f"interrupted in cell {progress.number}"
            return result
        result.status, result.seconds = "FAILED", time.monotonic() - start
        if isinstance(err, CellExecutionError):
            ename, evalue, traceback = err.ename, err.evalue, str(err)
        else:
            ename, evalue, traceback = type(err).__name__, str(err), "".join(_format_exception(err))
        message = (ANSI.sub("", evalue).strip().splitlines() or [""])[0][:200]
        where = f"cell {progress.number}/{progress.n_code}"
        result.error = f"{where}: {ename}: {message}"
        source = progress.last_cell.source if progress.last_cell is not None else ""
        _write_log(log, nb_path, f"{where} (In [{progress.number}] in JupyterLab)\n\n{source}",
                   ANSI.sub("", traceback) + "\n\nThe kernel process's own messages:\n" + _read(kernel_log))
        kernel_log.unlink(missing_ok=True)
        partial = log.with_suffix(".failed.ipynb")
        nbformat.write(nb, partial)
        result.log = log
        print(f"FAILED {nb_path.stem} at {where} (In [{progress.number}]) after {duration(result.seconds)}\n"
              f"    {ename}: {message}\n"
              f"    cell starts: {first_line(source, 70)}\n"
              f"    full traceback: {shown_path(log)}; the partly executed notebook: {shown_path(partial)}\n"
              f"    ({shown_path(nb_path)} itself is unchanged)", flush=True)
        return result
    finally:
        progress.stop()

    nbformat.write(nb, nb_path)
    if nb.metadata.get("jupytext", {}).get("formats"):
        synced = subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(nb_path)],
                                cwd=ROOT, capture_output=True, text=True)
        if synced.returncode != 0:
            return _step_failed(result, "jupytext --sync", synced, log, nb_path, start)
    for stale in (log, log.with_suffix(".failed.ipynb"), kernel_log):  # an earlier failure's records no longer apply
        stale.unlink(missing_ok=True)
    result.status, result.seconds = "ok", time.monotonic() - start
    print(f"ok {nb_path.stem} in {duration(result.seconds)} (outputs saved)", flush=True)
    return result


def _read(path: Path) -> str:
    """A kernel's own stderr, without ipykernel's notice about unencrypted local TCP."""
    try:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        return ""
    return "".join(x for x in lines if "Kernel is running over TCP without encryption" not in x)


def _format_exception(err: BaseException) -> list[str]:
    import traceback

    return traceback.format_exception(type(err), err, err.__traceback__)


def _step_failed(result: "Result", what: str, proc: subprocess.CompletedProcess, log: Path, nb_path: Path,
                 start: float) -> "Result":
    """Mark `result` failed because the helper command `what` failed; its output goes to the log."""
    result.status, result.seconds = "FAILED", time.monotonic() - start
    result.error = f"{what} failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    _write_log(log, nb_path, result.error, proc.stdout + proc.stderr)
    result.log = log
    return result


def _write_log(log: Path, nb_path: Path, header: str, body: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"{shown_path(nb_path)} failed, {time.strftime('%Y-%m-%d %H:%M:%S')}\n{header}\n\n{body}\n")


def select_chapters(names: list[str]) -> list[Path]:
    """Notebooks to run: all of chapters/NN_*.ipynb, or those matching `names` (01, 02_evaluation, paths)."""
    every = sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.exists():
            chosen.append(path)
            continue
        matches = [nb for nb in every if nb.stem == name or nb.stem.startswith(name.rstrip("_") + "_")
                   or nb.stem.startswith(name)]
        if not matches:
            raise SystemExit(f"no chapter matches {name!r}; chapters: {', '.join(nb.stem for nb in every)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def summary_table(results: list[Result]) -> str:
    width = max(len("chapter"), *(len(r.name) for r in results))
    lines = [f"{'chapter':{width}}  {'status':11}  {'time':>7}", f"{'-' * width}  {'-' * 11}  {'-' * 7}"]
    for r in results:
        time_s = duration(r.seconds) if r.status != "not run" else ""
        lines.append(f"{r.name:{width}}  {r.status:11}  {time_s:>7}" + (f"  {r.error}" if r.error else ""))
    total = sum(r.seconds for r in results)
    lines.append(f"{'total':{width}}  {'':11}  {duration(total):>7}")
    return "\n".join(lines)


def run_book(names: list[str], log_dir: Path = LOG_DIR) -> int:
    """Run the chosen chapters one after another; print the summary; return the exit status."""
    notebooks = select_chapters(names)
    results = [Result(nb.stem) for nb in notebooks]
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # nbclient's leftover tasks after a kernel died
    signal.signal(signal.SIGINT, _on_sigint)
    print(f"Running {len(notebooks)} chapter(s) with {sys.executable}; failures are logged in "
          f"{shown_path(log_dir)}/", flush=True)
    interrupted = False
    for i, nb in enumerate(notebooks):
        print(f"\n== [{i + 1}/{len(notebooks)}] {shown_path(nb)}", flush=True)
        try:
            results[i] = run_chapter(nb, log_dir)
        except KeyboardInterrupt:  # between cells (kernel start, export): the chapter did not finish
            results[i] = Result(nb.stem, "interrupted")
        if results[i].status == "interrupted" or INTERRUPTED.is_set():
            if results[i].status != "ok":
                results[i].status = "interrupted"
            interrupted = True
            break
    if any(_in_chapters(nb) for nb in notebooks) and not interrupted:
        exported = _export()
        if exported.returncode != 0:
            print("tools/export.py failed:\n" + exported.stdout + exported.stderr, flush=True)
    failed = [r for r in results if r.status != "ok"]
    print("\n" + summary_table(results), flush=True)
    if interrupted:
        print("interrupted", flush=True)
        return 130
    if failed:
        logs = [shown_path(r.log) for r in failed if r.log]
        print(f"{len(failed)} of {len(results)} chapter(s) failed" + (f"; tracebacks: {', '.join(logs)}" if logs else ""),
              flush=True)
        return 1
    print(f"all {len(results)} chapter(s) ran; outputs are saved in the notebooks", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- JupyterLab


def free_port(preferred: int = 8888) -> int:
    """`preferred` if nothing listens on it on 127.0.0.1, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def lab_command(port: int, token: str) -> list[str]:
    """The JupyterLab command `tools/book.sh lab` runs (and the tests start): this Python, the
    repository as root folder, opened on chapters/, on 127.0.0.1 only, with a known token; as root,
    --allow-root (JupyterLab refuses root otherwise)."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           "--ServerApp.default_url=/lab/tree/chapters"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def lab_url(port: int, token: str, path: str = "lab/tree/chapters") -> str:
    return f"http://127.0.0.1:{port}/{path}?token={token}"


def start_lab(port: int | None = None, token: str | None = None, **popen) -> tuple[subprocess.Popen, int, str]:
    """Start JupyterLab in the background; return the process, its port and its token. It runs in its
    own session, so that Ctrl-C reaches only us and we shut it down through its API."""
    port = port or free_port()
    token = token or secrets.token_hex(24)
    return subprocess.Popen(lab_command(port, token), cwd=ROOT, start_new_session=True, **popen), port, token


def wait_for_lab(process: subprocess.Popen, port: int, token: str, timeout: float = 180) -> bool:
    """Wait until the server answers its REST API (True), or exits, or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(lab_url(port, token, "api/status"), timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_lab(process: subprocess.Popen, port: int, token: str) -> None:
    """Shut the server down through its API (kernels included); terminate it if that does not work."""
    if process.poll() is None:
        try:
            request = urllib.request.Request(lab_url(port, token, "api/shutdown"), method="POST")
            urllib.request.urlopen(request, timeout=10).close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_lab(port: int | None) -> int:
    """`tools/book.sh lab`: start JupyterLab, print the URL to open once it answers, wait; Ctrl-C or
    SIGTERM shut it down (its kernels included)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    process, port, token = start_lab(port)
    try:
        if not wait_for_lab(process, port, token):
            print("JupyterLab did not start (see its messages above)", flush=True)
            return 1
        url = lab_url(port, token)
        bar = "=" * min(100, len(url) + 4)
        print(f"\n{bar}\nJupyterLab is running (this computer only). Open the chapters in a browser at:\n\n"
              f"  {url}\n\nOn a remote machine, forward the port first: ssh -L {port}:127.0.0.1:{port} <host>\n"
              f"Stop it with Ctrl-C.\n{bar}\n", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_lab(process, port, token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapters top to bottom, outputs saved in place")
    run.add_argument("chapters", nargs="*", help="01, 02_evaluation, or a notebook path (default: every chapter)")
    run.add_argument("--log-dir", type=Path, default=LOG_DIR, help="where failures' tracebacks go (default logs/book)")
    lab = sub.add_parser("lab", help="open the chapters in JupyterLab")
    lab.add_argument("--port", type=int, default=None, help="default 8888, or a free port if it is taken")
    args = parser.parse_args(argv)
    if args.command == "lab":
        return run_lab(args.port)
    try:
        return run_book(args.chapters, args.log_dir)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
