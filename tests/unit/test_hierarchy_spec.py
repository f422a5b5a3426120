"""The hierarchy spec (cmlab.admin.hierarchy_spec): one form for every hierarchy, and a clear
one-line error for each way a spec can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmlab.admin.hierarchy_spec import HierarchySpec, create_hierarchy
from cmlab.core.errors import ConfigError
from cmlab.site.config import load_config

SPEC = """
[defaults]
sync_interval = 0
auto_download = false
"replication.cmupdates_interval" = 0.2

[[site]]
code = "CAS"

[[site]]
code = "pr1"
parent = "CAS"

[[site]]
code = "SEC"
parent = "PR1"
settings = { "facts.pending_restart" = true, rescan_interval = 0.5 }
"""


def test_roles_are_inferred_and_settings_merge() -> None:
    spec = HierarchySpec.from_toml(SPEC)
    assert [(s.code, s.role, s.parent) for s in spec.sites] == [
        ("CAS", "cas", None),
        ("PR1", "primary", "CAS"),
        ("SEC", "secondary", "PR1"),
    ]
    assert spec.settings_of("SEC") == {
        "sync_interval": 0,
        "auto_download": False,
        "replication.cmupdates_interval": 0.2,
        "facts.pending_restart": True,
        "rescan_interval": 0.5,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [[site]]"),
        ("[[site]]\ncode = 'CAS'\n[[site]]\ncode = 'CAS'\nparent = 'CAS'", "appears twice"),
        ("[[site]]\ncode = 'CASX'", "three letters or digits"),
        ("[[site]]\ncode = 'C/S'", "three letters or digits"),
        ("[[site]]\ncode = 'PR1'\nparent = 'CAS'", "its parent 'CAS' must be a site listed"),
        ("[[site]]\ncode = 'CAS'\n[[site]]\ncode = 'PR1'", "has no parent"),
        ("[[site]]\ncode = 'PR1'\nrole = 'primary'", "the top site must be a cas"),
        (
            "[[site]]\ncode = 'CAS'\n[[site]]\ncode = 'SEC'\nrole = 'secondary'\nparent = 'CAS'",
            "a secondary site cannot be under CAS, a cas site",
        ),
        ("[[site]]\ncode = 'CAS'\nrole = 'tertiary'", "the role must be one of"),
        ("[defaults]\nsync = 1\n[[site]]\ncode = 'CAS'", "unknown setting 'sync'"),
        ("[defaults]\nsync_interval = true\n[[site]]\ncode = 'CAS'", "wrong type"),
        ("[defaults]\n'a.b.c' = 1\n[[site]]\ncode = 'CAS'", "not a site.toml key"),
        ("[[site]]\ncode = 'CAS'\ncolour = 'red'", "unknown key 'colour'"),
        ("[extra]\n[[site]]\ncode = 'CAS'", "unknown table 'extra'"),
        ("[[site]\ncode = 'CAS'", "not TOML"),
        ("site = 3", "no [[site]]"),
        ("site = [3]", "site 1 is not a table"),
    ],
)
def test_bad_specs_are_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^hierarchy spec: ") as err:
        HierarchySpec.from_toml(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_oversized_and_binary_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * 300_000)
    with pytest.raises(ConfigError, match="larger than"):
        HierarchySpec.load(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        HierarchySpec.load(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        HierarchySpec.load(tmp_path / "missing.toml")


def test_create_hierarchy_makes_and_joins_every_site(tmp_path: Path) -> None:
    sites = create_hierarchy(HierarchySpec.from_toml(SPEC), tmp_path / "lab")
    assert list(sites) == ["CAS", "PR1", "SEC"]
    cas, pr1, sec = (load_config(p) for p in sites.values())
    assert pr1.parent == str(sites["CAS"]) and sec.parent == str(sites["PR1"])
    assert sec.facts.values["pending_restart"] is True
    assert cas.replication.cmupdates_interval == 0.2
    assert sec.intervals.rescan == 0.5 and cas.intervals.rescan == 5.0
    # One Microsoft for the whole hierarchy: the children use the top site's cloud.
    assert pr1.content_source == cas.content_source
    with pytest.raises(ConfigError, match="has no key nope in \\[facts\\]"):
        create_hierarchy(
            HierarchySpec.from_dict(
                {"site": [{"code": "CAS", "settings": {"facts.nope": 1}}]},
            ),
            tmp_path / "other",
        )
