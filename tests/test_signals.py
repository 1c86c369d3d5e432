"""Stop signals: which signal asked is recorded and reported, and a new run in the same process starts clean."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from celeba_dist import signals
from celeba_dist.config import load_config
from celeba_dist.train.main import main

FAST = ["data.batch_size=16", "data.num_workers=0", "data.image_size=[32, 32]", "log.progress_bar=false",
        "log.image_grid_size=0", "train.log_every_steps=2", "train.sync_every_steps=1",
        "train.checkpoint_every_steps=3", "train.keep_last=100", "train.epochs=1", "train.eval_splits=[val]"]


@pytest.fixture
def harmless_signals():
    """USR2 and TERM do nothing outside the code under test (a late signal must not end pytest)."""
    old = {sig: signal.signal(sig, lambda *_: None) for sig in signals.DEFAULT_SIGNALS}
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_stop_reason_names_the_signal_and_sigterm_wins(harmless_signals):
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_requests() as stops:
        assert (stops.requested(), stops.reason()) == (False, None)
        signal.raise_signal(signal.SIGUSR2)
        assert (stops.requested(), stops.reason()) == (True, "preempt")
        signal.raise_signal(signal.SIGTERM)
        assert stops.reason() == "terminate"
        signal.raise_signal(signal.SIGUSR2)  # a later USR2 does not undo a SIGTERM
        assert stops.reason() == "terminate"
        assert stops.received == [signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR2]
    assert signal.getsignal(signal.SIGTERM) is before  # the earlier handler is back
    with signals.stop_requests() as later:  # the next run starts clean: the stop was the earlier run's
        assert (later.requested(), later.reason()) == (False, None)
        later.adopt("preempt")  # another rank's stop, as the training loop's agreement records it
        assert later.reason() == "preempt"
        with pytest.raises(ValueError, match="unknown stop reason"):
            later.adopt("later")
    assert stops.reason() == "terminate"


def _main_signalled(cfg, sig: signal.Signals) -> dict:
    """``main(cfg)`` with ``sig`` sent to this process once the run has written a new checkpoint."""
    ckpts = cfg.run_dir / "checkpoints"
    before = set(ckpts.glob("step-*.pt"))
    done = threading.Event()

    def send() -> None:
        while not done.is_set() and not set(ckpts.glob("step-*.pt")) - before:
            done.wait(0.05)
        if not done.is_set():
            os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        return main(cfg)
    finally:
        done.set()
        sender.join()


def test_each_run_in_a_process_reports_its_own_stop(pristine, tmp_path, harmless_signals):
    shards = pristine
    """SIGTERM → "terminated"; the next main() in the process does not inherit that stop: it trains
    until its own USR2 ("preempted"); the third completes with the steps of an uninterrupted run."""
    cfg = load_config("smiling_simple_cnn", FAST, data_dir=str(shards), run_dir=str(tmp_path / "run"))
    first = _main_signalled(cfg, signal.SIGTERM)
    assert first["status"] == "terminated" and first["global_step"] >= 3
    second = _main_signalled(cfg, signal.SIGUSR2)
    # a stop left over from the first run would end the second at its first step, as "terminated"
    assert second["status"] == "preempted" and second["global_step"] > first["global_step"] + 1
    third = main(cfg)
    train = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    assert third["status"] == "completed" and third["global_step"] == train // 16


def test_ctrl_c_again_is_forced_but_waits_for_the_end_of_an_uncut_block():
    """The first SIGINT is a stop request; one FORCE_AFTER_S later raises KeyboardInterrupt, except inside
    ``uncut()`` (a DataLoader starting its workers), where it comes once the block is whole."""
    import time

    with signals.stop_requests(signals.RUN_SIGNALS) as stops:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(signals.FORCE_AFTER_S + 0.2)
        assert stops.reason() == signals.TERMINATE and stops.received == [signal.SIGINT]
        finished = False
        with pytest.raises(KeyboardInterrupt, match="interrupted again"):
            with signals.uncut():
                os.kill(os.getpid(), signal.SIGINT)  # handled in this thread, at once
                time.sleep(0.1)
                finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt, match="interrupted again"):  # outside a block: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) != stops.handle  # the previous handler is back


def test_a_hangup_is_a_cancel_and_a_ctrl_c_delivered_twice_at_once_is_one_stop():
    """SIGHUP (the terminal or SSH session closed) and SIGINT ask to terminate, never to be requeued as SIGUSR2
    does; a Ctrl-C that reaches the process twice at once (from the terminal, and from a wrapper in its group that
    forwards it) stays one stop request with its checkpoint, not a forced stop without one."""
    import time

    for sig in (signal.SIGHUP, signal.SIGINT):
        with signals.stop_requests(signals.RUN_SIGNALS) as stops:
            try:
                os.kill(os.getpid(), sig)
                os.kill(os.getpid(), sig)  # well within FORCE_AFTER_S of the first
                time.sleep(0.1)
            except KeyboardInterrupt:
                pytest.fail(f"{sig.name} delivered twice at once forced the stop, giving up the checkpoint")
            assert (stops.reason(), stops.received) == (signals.TERMINATE, [sig, sig]), sig.name
