"""Git for the research loop: only training/train.py is ever committed or reset, agent text never reaches git as
an option, every run stays reachable, and the user's other work is left alone."""

import subprocess

import pytest

from server.errors import WorkspaceError
from server.gitops import TRAIN, Git


@pytest.fixture(autouse=True)
def isolated_git_config(tmp_path_factory, monkeypatch):
    """No global or system git config: identity and hooks come only from what each test sets up."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)


def sh(repo, *args, stdin=None):
    return subprocess.run(["git", *args], cwd=repo, input=stdin, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A workspace with one commit and a configured identity."""
    ws = tmp_path / "ws"
    (ws / "training").mkdir(parents=True)
    (ws / "training/train.py").write_text("LR = 0.04\n")
    (ws / "training/prepare.py").write_text("# frozen\n")
    (ws / "program.md").write_text("# program\n")
    (ws / ".gitignore").write_text("*.log\n")
    sh(ws, "init", "-q", "-b", "main")
    sh(ws, "config", "user.name", "Researcher")
    sh(ws, "config", "user.email", "researcher@example.com")
    sh(ws, "add", "-A")
    sh(ws, "commit", "-q", "-m", "init")
    return ws


def test_head_branch_and_short(repo):
    git = Git(repo)
    assert git.head() == sh(repo, "rev-parse", "HEAD")
    assert git.short(git.head()) == git.head()[:7]
    assert git.branch() == "main"
    sh(repo, "checkout", "-q", "--detach")
    assert git.branch() is None


def test_head_of_an_empty_repo_says_what_to_do(tmp_path):
    sh(tmp_path, "init", "-q")
    with pytest.raises(WorkspaceError, match="no commits yet"):
        Git(tmp_path).head()


def test_not_a_repository(tmp_path):
    with pytest.raises(WorkspaceError, match="not a git repository"):
        Git(tmp_path).head()


@pytest.mark.parametrize("tag", ["mar5", "a", "run-2", "v1.2_x", "A" * 64])
def test_valid_tags(tag):
    Git.validate_tag(tag)


@pytest.mark.parametrize("tag", ["--force", "-x", "", "a..b", "x.lock", "a/b", "a b", "A" * 65, ".hidden", "_x",
                                 "tag\n", "ü", "a:b", None])
def test_invalid_tags(tag):
    with pytest.raises(WorkspaceError, match="invalid session tag"):
        Git.validate_tag(tag)


def test_create_branch_checks_it_out_and_checkout_switches_back(repo):
    git = Git(repo)
    start = git.head()
    (repo / "training/train.py").write_text("LR = 0.02\n")  # an edit in progress travels along untouched
    assert not git.branch_exists("autoresearch/mar5")
    git.create_branch("autoresearch/mar5")
    assert git.branch_exists("autoresearch/mar5")
    assert git.branch() == "autoresearch/mar5" and git.head() == start
    assert (repo / "training/train.py").read_text() == "LR = 0.02\n"
    git.checkout("autoresearch/mar5")  # already there: nothing happens
    (repo / "training/train.py").write_text("LR = 0.04\n")
    git.checkout("main")
    assert git.branch() == "main"
    with pytest.raises(WorkspaceError, match="already exists"):
        git.create_branch("autoresearch/mar5")
    assert git.branch() == "main"


def test_create_branch_from_another_commit(repo):
    git = Git(repo)
    first = git.head()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    git.commit_train("x")
    git.create_branch("old", first)
    assert git.branch() == "old" and git.head() == first
    assert (repo / "training/train.py").read_text() == "LR = 0.04\n"


@pytest.mark.parametrize("name", ["--force", "-b", "a..b", "", "x y"])
def test_option_like_or_invalid_branch_names_are_refused(repo, name):
    git = Git(repo)
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        git.create_branch(name)
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        git.checkout(name)
    assert sh(repo, "branch", "--format=%(refname:short)") == "main"


@pytest.mark.parametrize("rev", ["--all", "-h", "nonexistent", "HEAD:training/train.py"])
def test_revisions_that_are_not_commits_are_refused(repo, rev):
    with pytest.raises(WorkspaceError, match="is not a commit"):
        Git(repo).commit_sha(rev)


def test_dirty_paths_lists_changes_but_not_ignored_files_or_server_state(repo):
    (repo / "training/train.py").write_text("LR = 0.02\n")
    (repo / "notes.txt").write_text("x")
    (repo / "debug.log").write_text("ignored")
    (repo / ".autoresearch").mkdir()
    (repo / ".autoresearch/ledger.jsonl").write_text("{}\n")
    (repo / "results.tsv").write_text("commit\n")
    sh(repo, "mv", "program.md", "PROGRAM.md")
    assert Git(repo).dirty_paths() == ["PROGRAM.md", "notes.txt", "program.md", TRAIN]


def test_ensure_only_train_dirty(repo):
    git = Git(repo)
    git.ensure_only_train_dirty()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    git.ensure_only_train_dirty()
    (repo / "training/prepare.py").write_text("# tampered\n")
    with pytest.raises(WorkspaceError) as info:
        git.ensure_only_train_dirty()
    assert "training/prepare.py" in str(info.value)
    assert "commit, stash, revert or git-ignore" in str(info.value)


def test_ensure_clean_for_checkout_ignores_untracked_files_only(repo):
    git = Git(repo)
    (repo / "notes.txt").write_text("untracked: a switch leaves it alone")
    git.ensure_clean_for_checkout()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    with pytest.raises(WorkspaceError, match="refusing to switch branches: uncommitted changes in training/train.py"):
        git.ensure_clean_for_checkout()


def test_train_changed(repo):
    git = Git(repo)
    assert not git.train_changed()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    assert git.train_changed()
    sh(repo, "add", TRAIN)
    assert git.train_changed()


def test_commit_train_commits_only_train_py_and_leaves_staged_work_staged(repo):
    git = Git(repo)
    (repo / "program.md").write_text("# my notes, staged\n")
    sh(repo, "add", "program.md")
    (repo / "training/train.py").write_text("LR = 0.02\n")
    message = "--amend lower LR\n\nsecond paragraph; $(rm -rf /) `x`"
    sha = git.commit_train(message)
    assert sha == git.head() == sh(repo, "rev-parse", "HEAD")
    assert sh(repo, "log", "-1", "--format=%B") == message
    assert sh(repo, "show", "--name-only", "--format=", "HEAD") == TRAIN
    assert sh(repo, "show", "HEAD:training/train.py") == "LR = 0.02"
    assert sh(repo, "diff", "--cached", "--name-only") == "program.md"  # still staged, not committed
    assert sh(repo, "log", "-1", "--format=%an <%ae>") == "Researcher <researcher@example.com>"
    assert not git.train_changed()


def test_commit_train_without_changes_returns_head(repo):
    git = Git(repo)
    head = git.head()
    assert git.commit_train("baseline") == head
    assert git.head() == head


def test_commit_train_uses_a_fallback_identity_only_when_none_is_configured(repo):
    sh(repo, "config", "--unset", "user.name")
    sh(repo, "config", "--unset", "user.email")
    (repo / "training/train.py").write_text("LR = 0.02\n")
    Git(repo).commit_train("x")
    assert sh(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>") == \
        "autoresearch-mcp <autoresearch@localhost>|autoresearch-mcp <autoresearch@localhost>"


def test_commit_train_fallback_does_not_write_config(repo):
    sh(repo, "config", "--unset", "user.name")
    (repo / "training/train.py").write_text("LR = 0.02\n")
    Git(repo).commit_train("x")
    result = subprocess.run(["git", "config", "--get", "user.name"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 1


def test_commit_train_skips_hooks_that_would_block_the_loop(repo):
    hook = repo / ".git/hooks/pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    (repo / "training/train.py").write_text("LR = 0.02\n")
    before = Git(repo).head()
    assert Git(repo).commit_train("x") != before


def test_set_ref_keeps_discarded_runs_reachable(repo):
    git = Git(repo)
    base = git.head()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    run = git.commit_train("lower LR")
    git.set_ref("r0001", run)
    git.reset_train_to(base)
    assert git.head() == base
    assert sh(repo, "rev-parse", "refs/autoresearch/runs/r0001") == run
    assert sh(repo, "show", "refs/autoresearch/runs/r0001:training/train.py") == "LR = 0.02"


@pytest.mark.parametrize("run_id", ["--force", "r1", "r0001/../x", "../r0001", ""])
def test_set_ref_refuses_bad_run_ids(repo, run_id):
    with pytest.raises(WorkspaceError, match="invalid run id"):
        Git(repo).set_ref(run_id, Git(repo).head())


def test_reset_train_to_touches_nothing_but_the_branch_and_train_py(repo):
    git = Git(repo)
    base = git.head()
    (repo / "training/train.py").write_text("LR = 0.02\n")
    git.commit_train("lower LR")
    (repo / "training/train.py").write_text("LR = 0.01  # uncommitted candidate\n")
    (repo / "program.md").write_text("# staged user work\n")
    sh(repo, "add", "program.md")
    (repo / "notes.txt").write_text("untracked user work")
    git.reset_train_to(base)
    assert git.head() == base and git.branch() == "main"
    assert (repo / "training/train.py").read_text() == "LR = 0.04\n"
    assert not git.train_changed()
    assert sh(repo, "diff", "--cached", "--name-only") == "program.md"
    assert (repo / "program.md").read_text() == "# staged user work\n"
    assert (repo / "notes.txt").read_text() == "untracked user work"


def test_diff_train(repo):
    git = Git(repo)
    base = git.head()
    assert git.diff_train(base) == ""
    (repo / "training/train.py").write_text("LR = 0.02\n")
    diff = git.diff_train(base)
    assert "-LR = 0.04\n+LR = 0.02\n" in diff and diff.startswith("diff --git a/training/train.py")


def test_show_file(repo):
    git = Git(repo)
    assert git.show_file(git.head(), "training/prepare.py") == "# frozen\n"
    with pytest.raises(WorkspaceError):
        git.show_file(git.head(), "missing.py")


def test_git_env_redirection_is_ignored(repo, tmp_path, monkeypatch):
    """A git hook running the server may export GIT_DIR/GIT_INDEX_FILE; the workspace must still be the target."""
    other = tmp_path / "other"
    sh(tmp_path, "init", "-q", str(other))
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git/index"))
    assert Git(repo).branch() == "main"
    assert Git(repo).head()


# ---- candidates: commits off the branch, a fast-forward on keep, a three-way merge for rebase


def test_commit_candidate_moves_no_branch_index_or_file_and_needs_no_configured_identity(repo):
    sh(repo, "config", "--unset", "user.name")
    sh(repo, "config", "--unset", "user.email")
    git = Git(repo)
    base = git.head()
    (repo / "notes.txt").write_text("untracked user work")
    sha = git.commit_candidate("LR = 0.02\n", base, "--amend lower LR")
    assert git.head() == base and sh(repo, "status", "--porcelain") == "?? notes.txt"
    assert sh(repo, "rev-parse", f"{sha}^") == base
    assert sh(repo, "diff", "--name-only", base, sha) == TRAIN
    assert sh(repo, "log", "-1", "--format=%B|%an", sha) == "--amend lower LR|autoresearch-mcp"
    assert git.commit_candidate("LR = 0.04\n", base, "same code") == base  # unchanged: no commit


def test_advance_branch_fast_forwards_only_from_the_expected_commit(repo):
    git = Git(repo)
    base = git.head()
    first = git.commit_candidate("LR = 0.02\n", base, "a")
    second = git.commit_candidate("LR = 0.01\n", base, "b")
    git.advance_branch(first, base)
    assert git.head() == first and git.branch() == "main"
    assert sh(repo, "diff", "--cached", "--name-only") == ""  # the index follows train.py
    assert (repo / TRAIN).read_text() == "LR = 0.04\n"  # the working tree is the agent's: untouched
    with pytest.raises(WorkspaceError):
        git.advance_branch(second, base)  # the branch is no longer at base
    assert git.head() == first


def test_merge_train_reapplies_a_change_and_reports_conflicts(repo):
    git = Git(repo)
    (repo / TRAIN).write_text("LR = 0.04\nDEPTH = 4\nWIDTH = 256\n")
    base = git.commit_train("three constants")
    ours = git.commit_candidate("LR = 0.04\nDEPTH = 4\nWIDTH = 512\n", base, "wider")
    theirs = git.commit_candidate("LR = 0.02\nDEPTH = 4\nWIDTH = 256\n", base, "lower LR")
    merged, conflicts = git.merge_train(base, ours, theirs, ("kept", "base", "run"))
    assert (merged, conflicts) == ("LR = 0.02\nDEPTH = 4\nWIDTH = 512\n", 0)
    clash = git.commit_candidate("LR = 0.04\nDEPTH = 4\nWIDTH = 128\n", base, "narrower")
    merged, conflicts = git.merge_train(base, ours, clash, ("kept", "base", "run"))
    assert conflicts == 1
    assert "<<<<<<< kept\nWIDTH = 512\n=======\nWIDTH = 128\n>>>>>>> run\n" in merged


def test_train_blob_ids_and_blob_id_agree(repo):
    git = Git(repo)
    base = git.head()
    sha = git.commit_candidate("LR = 0.02\n", base, "a")
    ids = git.train_blob_ids([base, sha, None, "not a sha"])
    assert ids == {git.blob_id("LR = 0.04\n"), git.blob_id("LR = 0.02\n")}
