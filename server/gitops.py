"""Git for the research loop: commit, reset, merge and diff training/train.py and nothing else.

A run trains a *candidate*: a commit whose tree is the kept commit's with train.py replaced, made with
commit-tree in a private index, so neither the branch, the index nor the working tree moves. Only `keep`
fast-forwards the branch to a candidate; the working-tree train.py is the agent's scratch copy throughout.

Git goes through GitPython: its reference model for HEAD and the branch, its command layer (the git CLI with
captured output, an argument list, never a shell) for the rest. Text that can come from the agent never reaches
git as an option: commit messages go through stdin, revisions are resolved with --end-of-options, paths follow
`--`, names are validated before use. The user's other work (staged or not) is never swept into a commit or reset.
"""

import re
import tempfile
from pathlib import Path

import git as gitpython
from git.refs import SymbolicReference

from server import layout
from server.errors import WorkspaceError

TRAIN = "training/train.py"
RUN_REF_PREFIX = "refs/autoresearch/runs/"  # keeps every run's commit reachable, discarded ones too
MAX_TAG_CHARS = 64
TAG_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TAG_CHARS - 1}}}")
RUN_ID_RE = re.compile(r"r[0-9]{4,}")
FALLBACK_IDENTITY = ("autoresearch-mcp", "autoresearch@localhost")
SERVER_STATE = (f"{layout.STATE_DIR}/", layout.RESULTS_NAME)  # the server's own files are never the user's dirty work
# Variables a git hook or wrapper may have set that would point our commands at another repository or index.
# GitPython passes the process environment on and cannot remove a variable, so each is pinned to this workspace.
REDIRECTING_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY",
                   "GIT_NAMESPACE", "GIT_PREFIX")


class Git:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self._repo: gitpython.Repo | None = None

    @property
    def repo(self) -> gitpython.Repo:
        """The GitPython repository, opened on first use (a missing repository is a plain WorkspaceError)."""
        if self._repo is None:
            try:
                repo = gitpython.Repo(self.workspace)
            except (gitpython.InvalidGitRepositoryError, gitpython.NoSuchPathError) as e:
                raise WorkspaceError(f"{self.workspace} is not a git repository (its root): create a workspace with "
                                     "`autoresearch-mcp init DIR` or point --workspace at one") from e
            common = Path(repo.common_dir)
            repo.git.update_environment(
                GIT_DIR=repo.git_dir, GIT_WORK_TREE=str(repo.working_tree_dir), GIT_INDEX_FILE=repo.index.path,
                GIT_COMMON_DIR=str(common), GIT_OBJECT_DIRECTORY=str(common / "objects"),
                GIT_NAMESPACE="", GIT_PREFIX="")
            self._repo = repo
        return self._repo

    def _run(self, *args: str, stdin: str | None = None, ok=(0,), env: dict | None = None) -> tuple[int, str]:
        """Run git in the workspace; (exit code, stdout). A code outside `ok` becomes a WorkspaceError with git's
        message. `env` overrides variables for this one command (a private index)."""
        options = dict(with_extended_output=True, with_exceptions=False, stdout_as_string=False,
                       strip_newline_in_stdout=False, env=env)
        if stdin is None:
            code, out, err = self.repo.git.execute(["git", *args], **options)
        else:
            with tempfile.TemporaryFile() as source:  # stdin must be a real file for the subprocess
                source.write(stdin.encode("utf-8"))
                source.seek(0)
                code, out, err = self.repo.git.execute(["git", *args], istream=source, **options)
        out = out.decode("utf-8", errors="replace")
        if code not in ok:
            detail = (str(err).strip() or out.strip())[-2000:]
            raise WorkspaceError(f"`git {' '.join(args)}` failed in {self.workspace} (exit {code}): {detail}")
        return code, out

    def _git(self, *args: str, stdin: str | None = None, env: dict | None = None) -> str:
        return self._run(*args, stdin=stdin, env=env)[1]

    # ---- names and revisions

    def commit_sha(self, rev: str) -> str:
        """The full sha of a commit; refuses anything that is not one (or that looks like an option)."""
        if not rev or rev.startswith("-"):
            raise WorkspaceError(f"{rev!r} is not a commit: expected a commit sha or a branch name")
        code, out = self._run("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", ok=(0, 1))
        if code:
            raise WorkspaceError(f"{rev!r} is not a commit in {self.workspace}")
        return out.strip()

    def _check_branch_name(self, name: str) -> None:
        if not name or name.startswith("-") or self._run("check-ref-format", f"refs/heads/{name}", ok=(0, 1))[0]:
            raise WorkspaceError(f"{name!r} is not a valid branch name")

    @staticmethod
    def validate_tag(tag: str) -> None:
        """Session tags become branch names (autoresearch/<tag>), so only a safe subset is accepted."""
        if not (isinstance(tag, str) and TAG_RE.fullmatch(tag)) or ".." in tag or tag.endswith(".lock"):
            raise WorkspaceError(
                f"invalid session tag {tag!r}: use 1-{MAX_TAG_CHARS} letters, digits, '.', '_' or '-', starting with "
                "a letter or digit, without '..' and not ending in '.lock' (for example 'mar5' or 'run-2')")

    @staticmethod
    def short(sha: str) -> str:
        return sha[:7]

    # ---- state

    def head(self) -> str:
        try:  # read from the refs themselves: no process, no object database
            return SymbolicReference.dereference_recursive(self.repo, "HEAD")
        except ValueError:
            raise WorkspaceError(f"{self.workspace} has no commits yet: commit the workspace files first "
                                 "(git add -A && git commit -m init)") from None

    def branch(self) -> str | None:
        """The checked-out branch, or None when HEAD is detached."""
        head = self.repo.head
        return None if head.is_detached else head.reference.name

    def branch_exists(self, name: str) -> bool:
        return not self._run("show-ref", "--verify", "--quiet", f"refs/heads/{name}", ok=(0, 1))[0]

    def _status(self) -> list[tuple[str, str]]:
        """(porcelain XY code, path) for every change git reports; ignored files are not reported."""
        entries = self._git("status", "--porcelain=v1", "-z", "--untracked-files=normal").split("\0")
        changes, i = [], 0
        while i < len(entries):
            entry = entries[i]
            i += 1
            if not entry:
                continue
            changes.append((entry[:2], entry[3:]))
            if entry[0] in "RC":  # a rename or copy is followed by its source path
                changes.append((entry[:2], entries[i]))
                i += 1
        return [(code, path) for code, path in changes if not path.startswith(SERVER_STATE)]

    def dirty_paths(self) -> list[str]:
        """Modified, staged, deleted and untracked paths (ignored files and the server's own state excluded)."""
        return sorted({path for _, path in self._status()})

    def ensure_clean_for_checkout(self) -> None:
        """Switching branches would carry uncommitted edits of tracked files along (or fail on them), so it needs
        a clean worktree; untracked files are left alone by a switch and do not count."""
        tracked = sorted({path for code, path in self._status() if code != "??"})
        if tracked:
            raise WorkspaceError(
                f"refusing to switch branches: uncommitted changes in {', '.join(tracked[:20])}. Commit, stash or "
                f"revert them first (for {TRAIN}: run or undo the pending edit), then retry.")

    def ensure_only_train_dirty(self) -> None:
        """Refuse to touch git while the user has other uncommitted work that a commit or reset could disturb."""
        others = [p for p in self.dirty_paths() if p != TRAIN]
        if others:
            shown = ", ".join(others[:20]) + (f" and {len(others) - 20} more" if len(others) > 20 else "")
            raise WorkspaceError(
                f"refusing to touch git: files other than {TRAIN} have uncommitted changes: {shown}. The server "
                f"only ever commits or resets {TRAIN}; commit, stash, revert or git-ignore those changes, then retry.")

    def train_changed(self) -> bool:
        """Whether the worktree's train.py differs from HEAD (staged or not)."""
        return bool(self._run("diff", "--quiet", "HEAD", "--", TRAIN, ok=(0, 1))[0])

    # ---- changes

    def create_branch(self, name: str, start: str = "HEAD") -> None:
        """Create branch `name` at `start` and check it out: a new session always works on its own branch."""
        self._check_branch_name(name)
        self._git("branch", "--no-track", "--", name, self.commit_sha(start))
        self.checkout(name)

    def checkout(self, name: str) -> None:
        self._check_branch_name(name)
        self._git("switch", "--no-guess", "--", name)

    def commit_train(self, message: str) -> str:
        """Commit exactly training/train.py on the branch with this message and return the new HEAD (the loop itself
        makes candidates with commit_candidate; this is for tools and benchmarks that build a history).

        `git commit -- <path>` commits that path only, so anything else the user staged stays staged and out of
        the commit. Unchanged code (a baseline or a repeat) is not committed again: HEAD is returned.
        """
        if not self.train_changed():
            return self.head()
        self._git("add", "--", TRAIN)
        # unattended: a signing prompt or a failing pre-commit hook must not stall or block the loop
        self._git(*self._identity(), "-c", "commit.gpgsign=false", "commit", "--no-verify", "--quiet", "-F", "-",
                  "--", TRAIN, stdin=message)
        return self.head()

    def commit_candidate(self, source: str, parent: str, message: str) -> str:
        """A commit of `source` as train.py on top of `parent`, touching no branch, index or working file; its
        tree is parent's with train.py alone replaced, so nothing else the user has (staged or not) gets in.
        The bytes committed are exactly `source`, the text pre-flight checked. Unchanged code (a baseline or a
        repeat) makes no commit: parent is returned."""
        parent = self.commit_sha(parent)
        blob = self._git("hash-object", "-w", "--stdin", stdin=source).strip()
        listing = self._git("ls-tree", "-z", parent, "--", TRAIN).rstrip("\0")
        if not listing:
            raise WorkspaceError(f"{TRAIN} is not in commit {self.short(parent)}: the workspace is not a research "
                                 "workspace (create one with `autoresearch-mcp init DIR`)")
        mode, _, old_blob = listing.split("\t", 1)[0].split()
        if old_blob == blob:
            return parent
        with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}  # a private index: the user's stays untouched
            self._git("read-tree", parent, env=index)
            self._git("update-index", "--add", "--cacheinfo", f"{mode},{blob},{TRAIN}", env=index)
            tree = self._git("write-tree", env=index).strip()
        # unattended: a signing prompt must not stall the loop (commit-tree runs no hooks)
        return self._git(*self._identity(), "-c", "commit.gpgsign=false", "commit-tree", tree, "-p", parent,
                         "-F", "-", stdin=message).strip()

    def advance_branch(self, new: str, old: str) -> None:
        """Fast-forward the checked-out branch from `old` to `new` (refused if it is no longer at `old`) and make
        the index's train.py match `new`. The working-tree train.py is left alone: it is the agent's scratch copy,
        and new's tree differs from old's in train.py only, so nothing else changes status."""
        new, old = self.commit_sha(new), self.commit_sha(old)
        self._git("update-ref", "-m", f"autoresearch: keep {self.short(new)}", "HEAD", new, old)
        self._git("reset", "-q", new, "--", TRAIN)

    def restore_train(self, sha: str) -> None:
        """Make train.py (index and working tree) the version of commit sha; the branch does not move."""
        self._git("restore", f"--source={self.commit_sha(sha)}", "--staged", "--worktree", "--", TRAIN)

    def blob_id(self, text: str) -> str:
        """The object id git would give this text (nothing is written)."""
        return self._git("hash-object", "--stdin", stdin=text).strip()

    def train_blob_ids(self, commits) -> set[str]:
        """The object ids of train.py in these commits (one git process for all of them)."""
        shas = sorted({c for c in commits if c and re.fullmatch(r"[0-9a-f]{40}", c)})
        if not shas:
            return set()
        out = self._git("cat-file", "--batch-check=%(objectname) %(objecttype)",
                        stdin="".join(f"{sha}:{TRAIN}\n" for sha in shas))
        return {line.split()[0] for line in out.splitlines() if line.endswith(" blob")}

    def merge_train(self, base: str, ours: str, theirs: str, labels: tuple[str, str, str]) -> tuple[str, int]:
        """Three-way merge of train.py: the change from base to theirs re-applied onto ours. Returns the merged
        text (with conflict markers, labelled ours / theirs, where both sides changed the same lines) and the
        number of conflicts."""
        texts = [self.show_file(sha, TRAIN) for sha in (ours, base, theirs)]
        with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as tmp:
            paths = []
            for name, text in zip(("ours", "base", "theirs"), texts):
                path = Path(tmp) / name
                path.write_text(text, encoding="utf-8")
                paths.append(str(path))
            # the two-sided marker style whatever the user's merge.conflictStyle: the hunks are parsed from it
            code, out = self._run("-c", "merge.conflictStyle=merge", "merge-file", "-p", "-L", labels[0], "-L", labels[1], "-L", labels[2],
                                  *paths, ok=range(0, 128))  # the exit code counts the conflicts
        return out, code

    def _identity(self) -> list[str]:
        """-c options with a fallback identity when none is configured (never written to the config)."""
        return [] if self._has_identity() else [
            "-c", f"user.name={FALLBACK_IDENTITY[0]}", "-c", f"user.email={FALLBACK_IDENTITY[1]}"]

    def _has_identity(self) -> bool:
        return all(self._run("config", "--get", key, ok=(0, 1))[1].strip()
                   for key in ("user.name", "user.email"))

    def set_ref(self, run_id: str, sha: str) -> None:
        """Pin a run's commit under refs/autoresearch/runs/<run_id> so no reset can make it unreachable."""
        if not RUN_ID_RE.fullmatch(run_id):
            raise WorkspaceError(f"invalid run id {run_id!r}: expected r0001, r0002, ...")
        self._git("update-ref", f"{RUN_REF_PREFIX}{run_id}", self.commit_sha(sha))

    def reset_train_to(self, sha: str) -> None:
        """Move the current branch to sha and make train.py (index and worktree) match it (a run of the model before
        candidates sits on the branch itself; discarding it moves the branch back).

        --soft moves only the branch; train.py is then restored alone, so other files are left exactly as they are.
        """
        sha = self.commit_sha(sha)
        self._git("reset", "--soft", sha)
        self._git("restore", f"--source={sha}", "--staged", "--worktree", "--", TRAIN)

    def diff_train(self, base_sha: str) -> str:
        """Unified diff of the worktree's train.py against base_sha ("" when identical)."""
        return self._git("diff", "--no-color", "--no-ext-diff", self.commit_sha(base_sha), "--", TRAIN)

    def diff_between(self, base_sha: str, sha: str) -> str:
        """Unified diff of train.py from one commit to another ("" when identical)."""
        return self._git("diff", "--no-color", "--no-ext-diff", self.commit_sha(base_sha), self.commit_sha(sha),
                         "--", TRAIN)

    def show_file(self, sha: str, path: str) -> str:
        return self._git("cat-file", "blob", f"{self.commit_sha(sha)}:{path}")
