"""Hostfile parsing and the include/exclude grammar (DeepSpeed's semantics, clearer errors)."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from ds_launch.hostfile import HostfileError, apply_filter, parse_hostfile, parse_node_specs, select_resources


def test_good_hostfile_keeps_order() -> None:
    pool = parse_hostfile("worker-1 slots=4\nworker-0 slots=2\n")
    assert list(pool.items()) == [("worker-1", 4), ("worker-0", 2)]


def test_comments_blank_lines_and_bare_host() -> None:
    text = "# cluster\n\nnode-a slots=2   # trailing comment\n   \nnode-b\n\tnode-c  slots = 8\n"
    assert parse_hostfile(text) == OrderedDict([("node-a", 2), ("node-b", 1), ("node-c", 8)])


def test_duplicate_host_names_both_lines() -> None:
    with pytest.raises(HostfileError, match=r"hf:3: host 'a' is listed twice \(first at line 1\)"):
        parse_hostfile("a slots=1\nb slots=1\na slots=2\n", source="hf")


@pytest.mark.parametrize("slots", ["0", "-1", "two", "1.5", ""])
def test_bad_slots(slots: str) -> None:
    with pytest.raises(HostfileError, match=r"hf:1: .*(slots must be a positive integer|expected 'hostname slots=N')"):
        parse_hostfile(f"a slots={slots}\n", source="hf")


def test_bad_entry_names_line() -> None:
    with pytest.raises(HostfileError, match=r"hf:2: bad entry 'b cpus=4'"):
        parse_hostfile("a slots=1\nb cpus=4\n", source="hf")


def test_host_with_separator_rejected() -> None:
    with pytest.raises(HostfileError, match="may not contain"):
        parse_hostfile("a@b slots=1\n", source="hf")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_hostfile(text: str) -> None:
    with pytest.raises(HostfileError, match="hf: hostfile has no hosts"):
        parse_hostfile(text, source="hf")


POOL = OrderedDict([("w0", [0, 1, 2, 3]), ("w1", [0, 1, 2, 3]), ("w2", [0, 1])])


def test_node_spec_grammar() -> None:
    assert parse_node_specs("w0@w1:0,2", "--include") == OrderedDict([("w0", None), ("w1", [0, 2])])
    with pytest.raises(HostfileError, match="empty node spec"):
        parse_node_specs("w0@@w1", "--include")
    with pytest.raises(HostfileError, match="slot 'x' of host 'w1'"):
        parse_node_specs("w1:x", "--include")
    with pytest.raises(HostfileError, match="no host name"):
        parse_node_specs(":1", "--exclude")


def test_include_whole_host_and_slots() -> None:
    assert apply_filter(POOL, include="w1:0,2@w0") == OrderedDict([("w0", [0, 1, 2, 3]), ("w1", [0, 2])])


def test_exclude_slot_and_host() -> None:
    assert apply_filter(POOL, exclude="w0:1@w2") == OrderedDict([("w0", [0, 2, 3]), ("w1", [0, 1, 2, 3])])


def test_exclude_all_slots_drops_host() -> None:
    assert list(apply_filter(POOL, exclude="w2:0,1")) == ["w0", "w1"]


def test_filter_errors() -> None:
    with pytest.raises(HostfileError, match="mutually exclusive"):
        apply_filter(POOL, include="w0", exclude="w1")
    with pytest.raises(HostfileError, match=r"--include: host 'w9' is not in the hostfile \(hosts: w0, w1, w2\)"):
        apply_filter(POOL, include="w9")
    with pytest.raises(HostfileError, match=r"--exclude: host 'w2' has no slot 5 \(its slots: 0, 1\)"):
        apply_filter(POOL, exclude="w2:5")
    with pytest.raises(HostfileError, match="leaves no resources"):
        apply_filter(POOL, exclude="w0@w1@w2")


def test_select_num_nodes_and_num_gpus() -> None:
    pool = OrderedDict([("a", 8), ("b", 8), ("c", 8)])
    assert select_resources(pool, num_nodes=2, num_gpus=2) == OrderedDict([("a", [0, 1]), ("b", [0, 1])])
    assert select_resources(pool, include="c:3@a:1") == OrderedDict([("a", [1]), ("c", [3])])
    with pytest.raises(HostfileError, match="cannot be combined"):
        select_resources(pool, include="a", num_gpus=1)
    with pytest.raises(HostfileError, match=r"--num_nodes 4 but only 3 host\(s\)"):
        select_resources(pool, num_nodes=4)
    with pytest.raises(HostfileError, match="--num_gpus 0"):
        select_resources(pool, num_gpus=0)
