"""The session store: history DAG, branches, navigation, cwd, pending files, env,
session keys, and concurrent appends from several processes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import uuid
from pathlib import Path

import pytest

from contree_shell.state.db import SCHEMA_VERSION, connect, schema_version
from contree_shell.state.errors import NoSession, StateError
from contree_shell.state.history import ShellHistory
from contree_shell.state.sessions import (
    Ref,
    SessionStore,
    derive_session_key,
    display_cwd,
    parse_ref,
    parse_target,
    resolve_path,
)

KEY = "proj+deadbeef"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cli" / "sessions" / "local.db"


@pytest.fixture
def store(db: Path) -> SessionStore:
    s = SessionStore(db)
    yield s
    s.close()


def chain(store: SessionStore, key: str = KEY, n: int = 3) -> list[int]:
    """use + (n-1) runs; returns node ids."""
    ids = [store.append(key, kind="use", image="img0", title="img0").id]
    for i in range(1, n):
        ids.append(store.append(key, kind="run", image=f"img{i}", title=f"cmd{i}").id)
    return ids


# -- the DB file ---------------------------------------------------------------


def test_db_is_wal_with_foreign_keys_and_private_dirs(db: Path, store: SessionStore) -> None:
    conn = connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert schema_version(conn) == SCHEMA_VERSION
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_busy_timeout_comes_from_contree_db_timeout(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTREE_DB_TIMEOUT", "2.5")
    conn = connect(db)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    monkeypatch.delenv("CONTREE_DB_TIMEOUT")
    assert connect(db).execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_reopening_does_not_rerun_migrations(db: Path) -> None:
    connect(db).close()
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [SCHEMA_VERSION]


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (99)")
    raw.commit()
    raw.close()
    with pytest.raises(StateError, match="newer than this contree-shell supports"):
        connect(path)


# -- append / state ------------------------------------------------------------


def test_first_append_creates_session_on_main(store: SessionStore) -> None:
    assert store.state(KEY) is None
    node = store.append(KEY, kind="use", image="img0", title="img0")
    st = store.state(KEY)
    assert st is not None
    assert (st.branch, st.tip, st.depth, st.cwd, st.image) == ("main", node, 1, "", "img0")
    assert node.parent_id is None
    assert store.branches(KEY) == [("main", node, True)]


def test_append_links_to_the_tip_and_counts_depth(store: SessionStore) -> None:
    ids = chain(store, n=4)
    nodes = store.history(KEY)
    assert [n.parent_id for n in nodes] == [None, *ids[:-1]]
    assert store.depth(KEY) == 4
    assert [n.id for n in store.ancestry(KEY)] == ids


def test_created_at_is_utc_iso_seconds(store: SessionStore) -> None:
    node = store.append(KEY, kind="use", image="i", title="i")
    assert len(node.created_at) == 20 and node.created_at.endswith("Z")


def test_empty_session_has_no_cwd_depth_or_files(store: SessionStore) -> None:
    assert store.cwd("nope") == ""
    assert store.depth("nope") == 0
    assert store.pending_files("nope") == []
    assert store.tip("nope") is None


def _append_many(db: str, key: str, tag: str, n: int) -> None:
    s = SessionStore(db)
    for i in range(n):
        s.append(key, kind="run", image=f"{tag}-{i}", title=f"{tag} {i}")
    s.close()


def _assert_linear(store: SessionStore, key: str, expected: int) -> None:
    nodes = store.history(key, all=True)
    assert len(nodes) == expected
    # A linear chain: every node except the root has a distinct parent, and the
    # tip's ancestry covers every node.
    parents = [n.parent_id for n in nodes]
    assert parents.count(None) == 1
    assert len(set(parents)) == len(parents)
    assert [n.id for n in store.ancestry(key)] == [n.id for n in nodes]
    assert store.depth(key) == expected


def test_concurrent_appends_from_two_processes_stay_linear(db: Path) -> None:
    SessionStore(db).close()  # create the schema first
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(db), KEY, t, 50)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with SessionStore(db) as s:
        _assert_linear(s, KEY, 100)
        images = {n.image for n in s.history(KEY, all=True)}
        assert images == {f"{t}-{i}" for t in "ab" for i in range(50)}


def test_concurrent_appends_from_two_threads_stay_linear(db: Path) -> None:
    stores = [SessionStore(db), SessionStore(db)]
    threads = [
        threading.Thread(
            target=lambda s=s, t=t: [  # type: ignore[misc]
                s.append(KEY, kind="run", image=f"{t}{i}", title="") for i in range(50)
            ]
        )
        for s, t in zip(stores, "xy", strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_linear(stores[0], KEY, 100)


def test_one_store_shared_by_threads_stays_linear(store: SessionStore) -> None:
    threads = [
        threading.Thread(
            target=lambda t=t: [  # type: ignore[misc]
                store.append(KEY, kind="run", image=f"{t}{i}", title="") for i in range(25)
            ]
        )
        for t in "pqrs"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_linear(store, KEY, 100)


# -- rollback / navigation -----------------------------------------------------


def test_rollback_default_goes_back_one(store: SessionStore) -> None:
    ids = chain(store)
    assert store.rollback(KEY).id == ids[1]
    assert store.tip(KEY).id == ids[1]  # type: ignore[union-attr]


def test_rollback_back_n_and_bounds(store: SessionStore) -> None:
    ids = chain(store, n=3)
    with pytest.raises(StateError, match=r"^Cannot go back 3 steps: only 2 ancestors available$"):
        store.rollback(KEY, "-3")
    assert store.tip(KEY).id == ids[2]  # type: ignore[union-attr]  # unchanged on error
    assert store.rollback(KEY, "-2").id == ids[0]
    with pytest.raises(StateError, match="only 0 ancestors"):
        store.rollback(KEY, "-1")


def test_rollback_zero_is_rejected(store: SessionStore) -> None:
    chain(store)
    for target in ("0", "-0", "+0"):
        with pytest.raises(StateError, match=r"^Navigation target must not be 0$"):
            store.rollback(KEY, target)


def test_rollback_absolute_id_must_belong_to_the_session(store: SessionStore) -> None:
    ids = chain(store)
    other = store.append("other", kind="use", image="x", title="x")
    assert store.rollback(KEY, str(ids[0])).id == ids[0]
    with pytest.raises(StateError, match=rf"^History entry {other.id} not found in this session$"):
        store.rollback(KEY, str(other.id))
    with pytest.raises(StateError, match="History entry 999 not found in this session"):
        store.rollback(KEY, "999")


def test_rollback_absolute_can_jump_to_another_branch_node(store: SessionStore) -> None:
    ids = chain(store)
    store.rollback(KEY, "-1")
    side = store.append(KEY, kind="run", image="side", title="side")
    assert store.rollback(KEY, str(ids[2])).id == ids[2]
    assert store.rollback(KEY, str(side.id)).id == side.id


def test_forward_at_a_fork_picks_the_newest_child(store: SessionStore) -> None:
    ids = chain(store, n=2)
    store.rollback(KEY, "-1")
    newer = store.append(KEY, kind="run", image="newer", title="newer")
    store.rollback(KEY, str(ids[0]))
    assert store.rollback(KEY, "+1").id == newer.id
    assert newer.id > ids[1]


def test_forward_bounds(store: SessionStore) -> None:
    ids = chain(store, n=3)
    store.rollback(KEY, "-2")
    with pytest.raises(StateError, match=r"^Cannot go forward 3 steps: only 2 children available$"):
        store.rollback(KEY, "+3")
    assert store.rollback(KEY, "+2").id == ids[2]


def test_rollback_without_session_raises_no_session(store: SessionStore) -> None:
    with pytest.raises(NoSession):
        store.rollback("ghost")


def test_rollback_rejects_garbage_target(store: SessionStore) -> None:
    chain(store)
    with pytest.raises(StateError, match="Invalid navigation target 'abc'"):
        store.rollback(KEY, "abc")


def test_rollback_keeps_every_node(store: SessionStore) -> None:
    chain(store, n=4)
    store.rollback(KEY, "-3")
    assert store.history_count(KEY) == 4


# -- refs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("HEAD", Ref("tip")),
        ("@", Ref("tip")),
        (":", Ref("tip")),
        ("@7", Ref("abs", 7)),
        (":7", Ref("abs", 7)),
        ("7", Ref("abs", 7)),
        ("@-2", Ref("back", 2)),
        (":-2", Ref("back", 2)),
        ("HEAD~2", Ref("back", 2)),
        ("HEAD~", Ref("back", 1)),
        ("@+1", Ref("fwd", 1)),
        (":+3", Ref("fwd", 3)),
    ],
)
def test_parse_ref_forms(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text", ["@0", "HEAD~0", "0", ":-0", "@+0"])
def test_zero_refs_are_rejected(text: str) -> None:
    with pytest.raises(StateError, match=r"^History reference must be a non-zero number$"):
        parse_ref(text)


@pytest.mark.parametrize("text", ["", "HEAD~x", "@-", "abc", "-3", "@@1"])
def test_bad_refs_are_rejected(text: str) -> None:
    with pytest.raises(StateError, match="Invalid history reference"):
        parse_ref(text)


def test_parse_target_accepts_signs_and_ref_forms() -> None:
    assert parse_target("-3") == Ref("back", 3)
    assert parse_target("+2") == Ref("fwd", 2)
    assert parse_target("12") == Ref("abs", 12)
    assert parse_target("HEAD~2") == Ref("back", 2)


def test_resolve_ref_walks_the_dag(store: SessionStore) -> None:
    ids = chain(store, n=4)
    assert store.resolve_ref(KEY, "HEAD").id == ids[3]
    assert store.resolve_ref(KEY, "@-1").id == ids[2]
    assert store.resolve_ref(KEY, "HEAD~3").id == ids[0]
    assert store.resolve_ref(KEY, f"@{ids[1]}").id == ids[1]
    assert store.resolve_ref(KEY, str(ids[1])).id == ids[1]
    store.rollback(KEY, "-2")
    assert store.resolve_ref(KEY, "@+2").id == ids[3]
    with pytest.raises(StateError, match="Cannot go back 9 steps"):
        store.resolve_ref(KEY, "HEAD~9")
    with pytest.raises(StateError, match="History entry 4242 not found"):
        store.resolve_ref(KEY, "@4242")


# -- cwd -----------------------------------------------------------------------


def test_cwd_is_the_nearest_cd_and_rolls_back(store: SessionStore) -> None:
    store.append(KEY, kind="use", image="i0", title="i0")
    store.append(KEY, kind="cd", image="i0", title="/etc")
    store.append(KEY, kind="run", image="i1", title="ls")
    assert store.cwd(KEY) == "/etc"
    store.append(KEY, kind="cd", image="i1", title="/usr/lib")
    assert store.cwd(KEY) == "/usr/lib"
    assert store.depth(KEY) == 4  # each cd counts
    store.rollback(KEY, "-1")
    assert store.cwd(KEY) == "/etc"
    store.rollback(KEY, "-2")
    assert store.cwd(KEY) == ""
    assert display_cwd(store.cwd(KEY)) == "/"


def test_cwd_is_per_branch(store: SessionStore) -> None:
    store.append(KEY, kind="use", image="i0", title="i0")
    store.create_branch(KEY, "side")
    store.append(KEY, kind="cd", image="i0", title="/srv")
    store.checkout(KEY, "side")
    assert store.cwd(KEY) == ""
    store.checkout(KEY, "main")
    assert store.cwd(KEY) == "/srv"


@pytest.mark.parametrize(
    ("cwd", "path", "expected"),
    [
        ("", "etc", "/etc"),
        ("/usr", "lib/../bin", "/usr/bin"),
        ("/usr", "/abs", "/abs"),
        ("/usr", "..", "/"),
        ("/", "../../x", "/x"),
        ("/a", "./b/", "/a/b"),
        ("", "//x//y", "/x/y"),
    ],
)
def test_resolve_path(cwd: str, path: str, expected: str) -> None:
    assert resolve_path(cwd, path) == expected


# -- branches ------------------------------------------------------------------


def test_create_branch_at_active_tip_and_from_other(store: SessionStore) -> None:
    ids = chain(store, n=2)
    assert store.create_branch(KEY, "exp").id == ids[1]
    store.checkout(KEY, "exp")
    extra = store.append(KEY, kind="run", image="e", title="e")
    assert store.create_branch(KEY, "exp2", from_branch="exp").id == extra.id
    assert store.create_branch(KEY, "m2", from_branch="main").id == ids[1]
    names = [(n, t.id, a) for n, t, a in store.branches(KEY)]
    assert names == [
        ("exp", extra.id, True),
        ("exp2", extra.id, False),
        ("m2", ids[1], False),
        ("main", ids[1], False),
    ]


def test_branch_errors(store: SessionStore) -> None:
    chain(store)
    store.create_branch(KEY, "x")
    with pytest.raises(StateError, match=r"^Branch 'x' already exists$"):
        store.create_branch(KEY, "x")
    with pytest.raises(StateError, match=r"^Branch 'nope' does not exist$"):
        store.create_branch(KEY, "y", from_branch="nope")
    with pytest.raises(StateError, match=r"^Branch 'nope' does not exist$"):
        store.checkout(KEY, "nope")
    with pytest.raises(StateError, match=r"^Branch 'nope' does not exist$"):
        store.delete_branch(KEY, "nope")
    with pytest.raises(StateError, match=r"^Cannot delete the active branch$"):
        store.delete_branch(KEY, "main")
    with pytest.raises(StateError, match="Invalid branch name"):
        store.create_branch(KEY, "has space")
    with pytest.raises(NoSession):
        store.create_branch("ghost", "b")


def test_appends_move_only_the_active_branch(store: SessionStore) -> None:
    ids = chain(store, n=2)
    store.create_branch(KEY, "keep")
    new = store.append(KEY, kind="run", image="n", title="n")
    tips = {n: t.id for n, t, _ in store.branches(KEY)}
    assert tips == {"keep": ids[1], "main": new.id}


def test_rollback_moves_only_the_active_branch(store: SessionStore) -> None:
    ids = chain(store, n=3)
    store.create_branch(KEY, "keep")
    store.rollback(KEY, "-2")
    tips = {n: t.id for n, t, _ in store.branches(KEY)}
    assert tips == {"keep": ids[2], "main": ids[0]}


def test_append_to_named_branch_forks_without_switching(store: SessionStore) -> None:
    ids = chain(store, n=2)
    node = store.append(
        KEY,
        kind="run-disposable",
        image="d",
        title="t",
        branch="disposable-op1",
        operation_uuid="op1",
    )
    assert node.parent_id == ids[1]
    st = store.state(KEY)
    assert st is not None and st.branch == "main" and st.tip is not None and st.tip.id == ids[1]
    again = store.append(KEY, kind="run-disposable", image="d2", title="t", branch="disposable-op1")
    assert again.parent_id == node.id


def test_delete_and_prune_branches(store: SessionStore) -> None:
    chain(store)
    for name in ("detached-a", "disposable-b", "feature", "detached-c"):
        store.create_branch(KEY, name)
    store.checkout(KEY, "detached-c")
    assert store.prune_branches(KEY) == ["detached-a", "disposable-b"]
    assert [n for n, _, _ in store.branches(KEY)] == ["detached-c", "feature", "main"]
    store.delete_branch(KEY, "feature")
    assert [n for n, _, _ in store.branches(KEY)] == ["detached-c", "main"]


def test_deleted_branch_keeps_its_nodes(store: SessionStore) -> None:
    chain(store)
    store.create_branch(KEY, "tmp")
    store.checkout(KEY, "tmp")
    n = store.append(KEY, kind="run", image="t", title="t")
    store.checkout(KEY, "main")
    store.delete_branch(KEY, "tmp")
    assert store.node(KEY, n.id) == n


def test_branch_labels(store: SessionStore) -> None:
    ids = chain(store, n=2)
    store.create_branch(KEY, "b")
    assert store.branch_labels(KEY) == {ids[1]: ["b", "main"]}


# -- history -------------------------------------------------------------------


def test_history_is_newest_last_with_limit_and_kind_prefix(store: SessionStore) -> None:
    store.append(KEY, kind="use", image="i", title="i")
    for i in range(25):
        store.append(KEY, kind="run", image=f"r{i}", title=str(i))
    store.append(KEY, kind="run-detached", image="d", title="d", branch="detached-x")
    store.append(KEY, kind="cd", image="r24", title="/tmp")
    last = store.history(KEY)
    assert len(last) == 20 and last[-1].kind == "cd"
    assert [n.id for n in last] == sorted(n.id for n in last)
    assert len(store.history(KEY, all=True)) == 28
    assert store.history_count(KEY) == 28
    runs = store.history(KEY, kind="run", all=True)
    assert len(runs) == 26 and runs[-1].kind == "run-detached"
    assert store.history_count(KEY, kind="run") == 26
    assert [n.kind for n in store.history(KEY, kind="cd")] == ["cd"]
    assert store.history(KEY, kind="ru") == []  # prefix means whole words only
    assert len(store.history(KEY, last=3)) == 3


def test_node_as_row_uses_official_columns(store: SessionStore) -> None:
    node = store.append(KEY, kind="use", image="i", title="t", operation_uuid="op")
    row = node.as_row()
    assert row["operation"] == "op" and "operation_uuid" not in row
    assert list(row)[:3] == ["id", "session_key", "image"]


# -- pending files -------------------------------------------------------------


def test_pending_files_newest_per_path_hidden_by_run_back_after_rollback(
    store: SessionStore,
) -> None:
    store.append(KEY, kind="use", image="i0", title="i0")
    store.add_file(KEY, "/app/a.txt", "f1")
    store.add_file(KEY, "/app/b.txt", "f2", uid=1000, gid=1000, mode=0o755)
    node = store.add_file(KEY, "/app/a.txt", "f3")
    assert node.kind == "file" and node.image == "i0" and node.title == "Change file /app/a.txt"
    files = store.pending_files(KEY)
    assert [(f.path, f.file_uuid, f.uid, f.gid, f.mode) for f in files] == [
        ("/app/a.txt", "f3", 0, 0, 0o644),
        ("/app/b.txt", "f2", 1000, 1000, 0o755),
    ]
    store.append(KEY, kind="run", image="i1", title="make")
    assert store.pending_files(KEY) == []
    store.add_file(KEY, "/app/c.txt", "f4")
    assert [f.path for f in store.pending_files(KEY)] == ["/app/c.txt"]
    store.rollback(KEY, "-2")  # before the run
    assert [f.file_uuid for f in store.pending_files(KEY)] == ["f3", "f2"]


def test_pending_files_are_branch_isolated(store: SessionStore) -> None:
    store.append(KEY, kind="use", image="i0", title="i0")
    store.create_branch(KEY, "other")
    store.add_file(KEY, "/main.txt", "m")
    store.checkout(KEY, "other")
    assert store.pending_files(KEY) == []
    store.add_file(KEY, "/other.txt", "o")
    assert [f.path for f in store.pending_files(KEY)] == ["/other.txt"]
    store.checkout(KEY, "main")
    assert [f.path for f in store.pending_files(KEY)] == ["/main.txt"]


def test_add_file_needs_a_session(store: SessionStore) -> None:
    with pytest.raises(NoSession):
        store.add_file("ghost", "/x", "u")


# -- env -----------------------------------------------------------------------


def test_env_set_unset_list_per_session(store: SessionStore) -> None:
    store.set_env(KEY, "B", "2")
    store.set_env(KEY, "A", "1")
    store.set_env(KEY, "A", "one")
    store.set_env("other", "A", "x")
    assert store.env(KEY) == {"A": "one", "B": "2"}
    assert list(store.env(KEY)) == ["A", "B"]
    assert store.unset_env(KEY, ["A", "NOPE"]) == ["A"]
    assert store.env(KEY) == {"B": "2"}
    assert store.env("other") == {"A": "x"}
    with pytest.raises(StateError):
        store.set_env(KEY, "A=B", "x")


# -- sessions ------------------------------------------------------------------


def test_sessions_listed_by_updated_at_desc_with_filter(store: SessionStore, db: Path) -> None:
    for key in ("alpha+1", "beta+2", "gamma+3"):
        store.append(key, kind="use", image=key, title=key)
    conn = sqlite3.connect(db)
    for key, ts in (("alpha+1", "2030"), ("beta+2", "2020"), ("gamma+3", "2025")):
        conn.execute("UPDATE session_state SET updated_at = ? WHERE session_key = ?", (ts, key))
    conn.commit()
    assert [s.key for s in store.sessions()] == ["alpha+1", "gamma+3", "beta+2"]
    assert [s.key for s in store.sessions("ta+")] == ["beta+2"]


def test_find_session_exact_then_literal_suffix(store: SessionStore) -> None:
    for key in ("web+abcd1234", "api+abcd9999", "a_b"):
        store.append(key, kind="use", image="i", title="i")
    assert store.find_session("web+abcd1234") == "web+abcd1234"
    assert store.find_session("1234") == "web+abcd1234"
    assert store.find_session("a_b") == "a_b"
    with pytest.raises(StateError, match=r"^Session 'zz' not found$"):
        store.find_session("zz")
    store.append("x+9", kind="use", image="i", title="i")
    with pytest.raises(StateError, match=r"Ambiguous session '9': matches api\+abcd9999, x\+9"):
        store.find_session("9")
    with pytest.raises(StateError, match="not found"):
        store.find_session("_b1")  # `_` is literal, not a wildcard


def test_delete_removes_everything_of_one_session(store: SessionStore, db: Path) -> None:
    store.append(KEY, kind="use", image="i", title="i")
    store.add_file(KEY, "/f", "u")
    store.create_branch(KEY, "b")
    store.set_env(KEY, "A", "1")
    ShellHistory(db, KEY).append("ls")
    store.append("other", kind="use", image="o", title="o")
    assert store.delete(KEY) is True
    assert store.state(KEY) is None and store.env(KEY) == {} and store.history(KEY) == []
    assert ShellHistory(db, KEY).lines() == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM session_files").fetchone()[0] == 0
    assert store.state("other") is not None
    assert store.delete(KEY) is False


def test_two_stores_on_one_db_see_each_other(db: Path) -> None:
    a, b = SessionStore(db), SessionStore(db)
    a.append(KEY, kind="use", image="i", title="i")
    node = b.append(KEY, kind="run", image="j", title="j")
    assert a.tip(KEY) == node


# -- session key ---------------------------------------------------------------


def test_session_key_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_SESSION", "from-env")
    assert derive_session_key("p", "explicit") == "explicit"
    assert derive_session_key("p", None) == "from-env"


def test_auto_session_key_matches_the_official_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONTREE_SESSION", raising=False)
    work = tmp_path / "myproj"
    work.mkdir()
    monkeypatch.chdir(work)
    tty = "notty"
    for fd in (0, 1, 2):
        if os.isatty(fd):
            tty = os.ttyname(fd).replace("/", "_")
            break
    digest = uuid.uuid5(uuid.NAMESPACE_OID, f"prof_{os.getppid()}_{tty}").hex[:8]
    assert derive_session_key("prof", None) == f"myproj+{digest}"
    assert derive_session_key("other", None) != f"myproj+{digest}"
    monkeypatch.chdir("/")
    assert derive_session_key("prof", None) == f"session+{digest}"


def test_corrupt_db_is_a_one_line_state_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match=r"Cannot open state DB .*move it aside"):
        SessionStore(path)


def test_lock_timeout_is_a_one_line_state_error(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_DB_TIMEOUT", "0.2")
    store = SessionStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateError, match=r"locked by another contree process \(waited 0.2s\)"):
            store.append(KEY, kind="use", image="i", title="i")
    finally:
        holder.execute("ROLLBACK")
    assert store.append(KEY, kind="use", image="i", title="i").id == 1
