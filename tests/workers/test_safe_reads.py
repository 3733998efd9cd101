"""What a worker reads on a spec's word: `data.path` files (regular, under the data roots, never
more than used) and checkpoints (tensors and plain data, never code)."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch

from gradwatch.spec import DATA_ROOTS_ENV, JobSpec, TextData
from workers.data import CorpusRefused, build_data, read_corpus
from workers.session import LocalSession
from workers.training import STATE_FILE, Run

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "corpora"
    folder.mkdir()
    (folder / "book.txt").write_text(TEXT)
    return folder


def refused(path: str, roots: list[str] | None, max_chars: int | None = 1000) -> str:
    with pytest.raises(CorpusRefused) as caught:
        read_corpus(path, max_chars, roots)
    return str(caught.value)


def test_a_file_under_a_root_is_read(root):
    assert read_corpus(str(root / "book.txt"), 100, [str(root)]) == TEXT[:100]


def test_outside_the_roots_nothing_is_said_about_the_file(root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret " * 99)
    messages = {
        refused(str(secret), [str(root)]).replace(str(secret), "P"),
        refused(str(tmp_path / "missing.txt"), [str(root)]).replace(str(tmp_path / "missing.txt"), "P"),
    }
    assert messages == {
        f"data.path 'P': cannot be used; it must be a readable regular UTF-8 file under the data roots ({root})"
    }


def test_a_link_out_of_a_root_is_refused(root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret " * 99)
    (root / "innocent.txt").symlink_to(secret)
    (root / "up").symlink_to(tmp_path)
    refused(str(root / "innocent.txt"), [str(root)])
    refused(str(root / "up" / "secret.txt"), [str(root)])


def test_devices_are_refused_even_with_user_code(root):
    refused("/dev/zero", None)
    refused("/dev/urandom", None)
    refused(str(root), None)  # a folder


def test_a_fifo_is_refused_without_waiting_for_a_writer(root):
    fifo = root / "pipe"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def read() -> None:
        try:
            read_corpus(str(fifo), 1000, [str(root)])
        except CorpusRefused as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive() and isinstance(outcome[0], CorpusRefused)


def test_a_huge_file_is_read_only_as_far_as_used(root):
    huge = root / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024**3)  # 64 GiB, sparse: reading it whole would take minutes and the memory
    start = time.perf_counter()
    text = read_corpus(str(huge), 1000, [str(root)])
    assert len(text) == 1000 and time.perf_counter() - start < 1


def test_a_multibyte_character_cut_by_the_limit_is_dropped(root):
    (root / "greek.txt").write_text("αβγδ" * 100, encoding="utf-8")
    assert read_corpus(str(root / "greek.txt"), 5, [str(root)]) == "αβγδα"


def test_workers_check_the_roots_the_launch_gave_them(root, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret " * 99)
    # Built unchecked, as a worker may get it from a spec the service checked under other roots.
    data = TextData.model_construct(name="text", path=str(secret), block_size=8)
    monkeypatch.setenv(DATA_ROOTS_ENV, str(root))
    with pytest.raises(CorpusRefused):
        build_data(data, seed=0)
    monkeypatch.setenv(DATA_ROOTS_ENV, "")  # no roots at all: nothing
    with pytest.raises(CorpusRefused):
        build_data(data, seed=0)
    monkeypatch.delenv(DATA_ROOTS_ENV)  # `gradwatch run`, or a server with user code
    assert build_data(data, seed=0).vocab is not None


# ---------------------------------------------------------------- checkpoints
class Boom:
    """A pickle that runs code when loaded: what a tampered checkpoint in shared storage could hold."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["GRADWATCH_TEST_MARKER"]),))


def parts():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def watched(session, model, optimizer, scheduler) -> Run:
    spec = JobSpec.model_validate(
        {"name": "t", "train": {"entrypoint": "mypkg.train:main"}, "max_steps": 10}, context={"user_code": "skip"}
    )
    run = Run(session, spec, job_id="t", serve_metrics=False)
    run.watch(model, optimizer, scheduler)
    return run


def test_checkpoints_round_trip_as_weights_only(tmp_path):
    session = LocalSession(tmp_path)
    model, optimizer, scheduler = parts()
    watched(session, model, optimizer, scheduler).save_checkpoint({"first_val_loss": 2.5, "cursor": [1, 2]})
    fresh_model, fresh_optimizer, fresh_scheduler = parts()
    extra = watched(session, fresh_model, fresh_optimizer, fresh_scheduler).restore()
    assert extra == {"first_val_loss": 2.5, "cursor": [1, 2]}
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_checkpoint_that_holds_code_is_refused_unrun(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("GRADWATCH_TEST_MARKER", str(marker))
    model, optimizer, scheduler = parts()
    session = LocalSession(tmp_path / "checkpoints")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    torch.save({"model": model.state_dict(), "payload": Boom()}, tampered / STATE_FILE)
    session.report({}, tampered)  # now the latest checkpoint of the run
    with pytest.raises(pickle.UnpicklingError):
        watched(session, model, optimizer, scheduler).restore()
    assert not marker.exists()
