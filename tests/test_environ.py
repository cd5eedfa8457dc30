"""stochnorm_ext._environ.reader: a variable read at every call (the backend choice, the
poison fill), through os.environ's own dict where CPython has one."""
import os

import torch

from stochnorm_ext import _environ

NAME = "STOCHNORM_EXT_TEST_ENVIRON_READER"


def test_reads_the_current_value_at_every_call(monkeypatch):
    read = _environ.reader(NAME)
    monkeypatch.delenv(NAME, raising=False)
    assert read() is None
    monkeypatch.setenv(NAME, "one")
    assert read() == "one"
    monkeypatch.setenv(NAME, "")
    assert read() == ""
    os.environ[NAME] = "twö"  # set without monkeypatch: the same dict
    assert read() == "twö"
    monkeypatch.delenv(NAME)
    assert read() is None


def test_without_cpythons_dict_it_asks_os_environ(monkeypatch):
    read = _environ.reader(NAME)
    monkeypatch.setenv(NAME, "kept")
    monkeypatch.setattr(os, "environ", {NAME: "plain"})  # a mapping without _data
    assert read() == "plain"


def test_traced_code_reads_it_too(monkeypatch):
    read = _environ.reader(NAME)
    monkeypatch.setenv(NAME, "3")

    @torch.compile(backend="eager", fullgraph=True)
    def scaled(x):
        return x * int(read())

    assert torch.equal(scaled(torch.ones(2)), torch.full((2,), 3.0))
