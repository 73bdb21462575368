"""Ctrl-C is never lost, even where Python swallows the KeyboardInterrupt it raises."""

from __future__ import annotations

import os
import signal
import time

import pytest
from torch.utils.data import dataloader

from cause_cli.data import open_dataset
from cause_cli.data.loading import LoadReport, iterate_batches
from cause_cli.interrupts import raise_if_interrupted, remembered_interrupts

from .test_datasets import make_coco

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def press_ctrl_c_and_wait() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(2)  # the handler runs during the sleep, which it ends by raising


class Finaliser:
    def __del__(self) -> None:
        press_ctrl_c_and_wait()  # Python prints "Exception ignored" and goes on


def test_a_ctrl_c_that_a_finaliser_swallows_is_raised_again_and_forgotten_after_the_command():
    with remembered_interrupts():
        Finaliser()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_a_loader_shuts_its_workers_down_stops_the_next_batch(tmp_path, monkeypatch):
    make_coco(tmp_path, train=4, val=1)
    dataset = open_dataset("cocostuff27", tmp_path, "train", 16)
    shut_down = dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    pressed = []

    def pressed_while_shutting_down(loader_iterator):
        if not pressed:
            pressed.append(True)
            press_ctrl_c_and_wait()
        shut_down(loader_iterator)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", pressed_while_shutting_down)
    with remembered_interrupts():
        epoch = iterate_batches(dataset, 2, LoadReport(), workers=1)
        next(epoch)  # a step that has the batches it wants leaves the rest unread
        del epoch  # the loader's iterator is finalised here, where the KeyboardInterrupt is lost
        assert pressed
        with pytest.raises(KeyboardInterrupt):
            next(iterate_batches(dataset, 2, LoadReport()))
