"""A progress line on the driver while Ray Train workers prune.

Why: the metrics are computed in a Ray worker, possibly on another node, and go to MLflow; the
terminal that started the run saw nothing for minutes. Rank 0 now also puts each step's metrics
into a small Ray queue (an actor, reachable from every node; the put is fire-and-forget, so a
slow driver never slows training), and a driver thread turns them into one line:

    step 12/64 (19%) | 2,345 tok/s | loss 6.912 | primal 0.421 | val(proj) 6.93 | ETA 1m23s

rewritten in place on a terminal, printed as plain lines every ``interval`` seconds (and at the
first and last step) when stdout is not a TTY (CI, ``ray job`` logs). The one-shot stage (a
method run, or the warm start an ELSA run begins from) reports per decoder block instead:

    sparsegpt (warm start): block 12/30 (40%) | 5.8 s/block | ETA 1m44s
"""

from __future__ import annotations

import sys
import threading
import time

NUMERIC = (int, float)


class ProgressSink:
    """Worker side: forwards a step's numeric metrics to the driver's queue (picklable)."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, metrics: dict, step: int) -> None:
        item = {k: float(v) for k, v in metrics.items() if isinstance(v, NUMERIC) and not isinstance(v, bool)}
        item["step"], item["time"] = float(step), time.time()
        try:
            self.queue.actor.put_nowait.remote(item)  # fire-and-forget; a full queue drops the item
        except Exception:  # noqa: BLE001 - progress must never fail a pruning run
            pass


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressLine:
    """Turns metric updates into the text of the progress line (keeps the last seen values)."""

    def __init__(self, total_steps: int, tokens_per_step: int):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.step = 0
        self.first: tuple[float, float] | None = None  # (step, time) of the first update
        self.last_time = 0.0
        self.values: dict[str, float] = {}

    def update(self, item: dict) -> None:
        step = int(item.get("step", self.step))
        if "train_loss" in item:
            self.step, self.last_time = step, item["time"]
            if self.first is None:
                self.first = (step, item["time"])
        for key in ("train_loss", "primal_residual", "val_loss_projected"):
            if key in item:
                self.values[key] = item[key]

    def rate(self) -> float | None:
        """Steps per second since the first update."""
        if self.first is None or self.step <= self.first[0] or self.last_time <= self.first[1]:
            return None
        return (self.step - self.first[0]) / (self.last_time - self.first[1])

    def text(self) -> str:
        parts = [f"step {self.step}/{self.total} ({self.step / max(self.total, 1):.0%})"]
        rate = self.rate()
        if rate:
            parts.append(f"{rate * self.tokens_per_step:,.0f} tok/s")
        if "train_loss" in self.values:
            parts.append(f"loss {self.values['train_loss']:.4g}")
        if "primal_residual" in self.values:
            parts.append(f"primal {self.values['primal_residual']:.3g}")
        if "val_loss_projected" in self.values:
            parts.append(f"val(proj) {self.values['val_loss_projected']:.4g}")
        if rate:
            parts.append(f"ETA {_duration((self.total - self.step) / rate)}")
        return " | ".join(parts)


class BlockLine:
    """The one-shot stage's line: blocks done of the model's decoder blocks, time per block, ETA.

    Fed by the layer-wise pass's log (``{"block": index, "blocks": count, "block_s": seconds}``).
    """

    def __init__(self, label: str):
        self.label = label
        self.step = self.total = 0  # blocks done, blocks in the model
        self.seconds = 0.0

    def update(self, item: dict) -> None:
        if "block" not in item:
            return
        self.step = int(item["block"]) + 1
        self.total = int(item.get("blocks", self.total))
        self.seconds += float(item.get("block_s", 0.0))

    def text(self) -> str:
        parts = [f"{self.label}: block {self.step}/{self.total} ({self.step / max(self.total, 1):.0%})"]
        if self.step:
            per_block = self.seconds / self.step
            parts += [f"{per_block:.1f} s/block", f"ETA {_duration(per_block * (self.total - self.step))}"]
        return " | ".join(parts)


class ProgressPrinter:
    """Driver side: a thread draining the queue into a line (:class:`ProgressLine`, :class:`BlockLine`)
    and printing it."""

    def __init__(self, line, stream=None, interval: float = 10.0, queue=None):
        if queue is None:
            from ray.util.queue import Queue

            queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})  # never waits for a core
        self.queue = queue  # a ray.util.queue.Queue, or anything with empty/qsize/get_nowait_batch
        self.line = line
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._printed_step, self._printed_at = -1, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elsa-progress", daemon=True)

    def sink(self) -> ProgressSink:
        return ProgressSink(self.queue)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        self._drain()
        self._print(final=True)
        if self.tty and self._printed_step >= 0:
            self.stream.write("\n")
            self.stream.flush()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - the queue actor may already be gone with Ray
            pass

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                for item in self.queue.get_nowait_batch(self.queue.qsize()):
                    self.line.update(item)
        except Exception:  # noqa: BLE001 - Ray shutting down: nothing more to show
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._drain()
            self._print()

    def _print(self, final: bool = False) -> None:
        step = self.line.step
        if step <= 0 or step == self._printed_step:
            return
        now = time.monotonic()
        first, last = self._printed_step < 0, step >= self.line.total
        due = self.tty or final or first or last or now - self._printed_at >= self.interval
        if not due:
            return
        text = self.line.text()
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self._printed_step, self._printed_at = step, now
        stage(f"since: {text}")  # a silence after this line says how long it has been


class QuietWatchdog:
    """No stretch of silence on the terminal: while a job runs, a line says what it is doing
    whenever nothing was printed for ``quiet_s`` seconds.

    Why: loading a model, Ray Train's start or an export can take minutes with nothing to show,
    and a silent terminal looks like a hung one. Installed as ``sys.stdout`` for the job (every
    ``print`` and progress line passes through and resets the clock); :func:`stage` names the
    current stage, and the line says how long it has lasted::

        ... starting the Ray Train workers (12 s)
    """

    _active: "QuietWatchdog | None" = None

    def __init__(self, stream=None, quiet_s: float = 10.0):
        self.stream = stream or sys.stdout
        self.quiet_s = quiet_s
        self.stage_name, self._stage_since = "working", time.monotonic()
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elsa-watchdog", daemon=True)

    # the stream protocol: what print() and the progress printer use
    def write(self, text: str) -> int:
        with self._lock:
            self._last = time.monotonic()
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def __getattr__(self, name):  # encoding, fileno...: the real stream's
        return getattr(self.stream, name)

    def stage(self, name: str) -> None:
        self.stage_name, self._stage_since = name, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if now - self._last >= self.quiet_s:
                self.write(f"  ... {self.stage_name} ({_duration(now - self._stage_since)})\n")
                self.flush()

    def __enter__(self) -> "QuietWatchdog":
        self._saved, sys.stdout = sys.stdout, self
        QuietWatchdog._active = self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        sys.stdout, QuietWatchdog._active = self._saved, None


def stage(name: str) -> None:
    """Name what the job does now, for the watchdog's lines (nothing without one)."""
    if QuietWatchdog._active is not None:
        QuietWatchdog._active.stage(name)
