"""Pre-flight check of train.py, before any budget is spent: a static (AST-only, never executed) look for code
that cannot run or that would tamper with the frozen harness.

It guards against accidents and casual metric gaming, not against deliberately hidden code (train.py is
arbitrary Python; the run-time pins in the run manager and a container are the stronger defences). So the rules
are narrow, to stay quiet on ordinary training code, and each names the line at fault and what to do.
"""

import ast

from server.errors import WorkspaceError

HARNESS = "prepare"            # the frozen module train.py imports from
METRIC = "evaluate_bpb"        # the one function allowed to produce val_bpb
# The server alone chooses these; train.py may neither read nor set them.
SERVER_SETTINGS = ("AUTORESEARCH_RESULT_FILE", "AUTORESEARCH_PROFILE", "AUTORESEARCH_TIME_BUDGET",
                   "AUTORESEARCH_DATASET", "result.json")
HARNESS_FILE = "prepare.py"
# Calls that change the file whose path they are given (os, shutil and pathlib spellings). Path.write_text and
# write_bytes take the path as their receiver and content as arguments; shutil's copies only change their target.
FILE_MUTATORS = {"open", "unlink", "remove", "rename", "replace", "touch", "chmod", "truncate", "move"}
CONTENT_WRITERS = {"write_text", "write_bytes"}
COPIES = {"copy", "copy2", "copyfile"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_APPEND", "O_TRUNC", "O_CREAT"}
MAX_REPORTED = 10


def preflight(source: str) -> None:
    """Raise WorkspaceError("train.py line N: ...", one line per problem) if train.py should not be run."""
    tree = _parse(source)
    modules, names = _harness_imports(tree)
    protected = set(modules) | set(names)
    problems = [
        *_star_imports(tree),
        *_metric_problems(tree, modules, names),
        *_global_rebindings(tree, protected - _metric_aliases(names)),
        *_harness_mutations(tree, protected),
        *_server_settings(tree),
        *_harness_writes(tree, modules),
    ]
    if problems:
        report = sorted(set(problems))[:MAX_REPORTED]
        raise WorkspaceError("\n".join(f"train.py line {line}: {message}" for line, message in report))


def _parse(source: str) -> ast.Module:
    """Parse, then compile too: some errors (`return` outside a function, bad `nonlocal`) only show up there."""
    try:
        tree = ast.parse(source, "train.py")
        compile(tree, "train.py", "exec")
    except SyntaxError as e:
        raise WorkspaceError(f"train.py line {e.lineno or 1}: {type(e).__name__}: {e.msg}") from None
    except ValueError as e:  # NUL bytes in the source, on Python < 3.12
        raise WorkspaceError(f"train.py line 1: {e}") from None
    return tree


def _harness_imports(tree: ast.Module) -> tuple[dict, dict]:
    """Local names bound by importing prepare: {module alias: line} and {name: (name in prepare, line)}."""
    modules, names = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == HARNESS:
                    modules[alias.asname or HARNESS] = node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == HARNESS and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    names[alias.asname or alias.name] = (alias.name, node.lineno)
    return modules, names


def _metric_aliases(names: dict) -> set:
    return {local for local, (original, _) in names.items() if original == METRIC}


def _star_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == HARNESS and any(a.name == "*" for a in node.names):
            yield node.lineno, (f"`from {HARNESS} import *` hides which names come from the harness: import the "
                                f"ones you use by name (e.g. `from {HARNESS} import MAX_SEQ_LEN, {METRIC}`)")


def _metric_problems(tree, modules, names):
    """val_bpb must come from prepare's evaluate_bpb: it must be called, and never shadowed, in any scope."""
    aliases = _metric_aliases(names)
    called = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called |= (isinstance(func, ast.Name) and func.id in aliases) or (
                isinstance(func, ast.Attribute) and func.attr == METRIC and _root(func.value) in modules)
        for name, line in _bound_names(node):
            if name in aliases | {METRIC}:
                yield line, (f"defines its own `{name}`: the metric must come from {HARNESS}.{METRIC}; "
                             "rename your function or variable")
    if not called:
        line = min([line for _, line in names.values()] + list(modules.values()), default=1)
        yield line, (f"never calls {METRIC} imported from {HARNESS}: end training with "
                     f"`from {HARNESS} import {METRIC}` and `val_bpb = {METRIC}(model, tokenizer, batch_size)`")


def _bound_names(node):
    """(name, line) for each name this node binds, whatever the scope, except imports from prepare itself."""
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        yield node.id, node.lineno
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name, node.lineno
    elif isinstance(node, (ast.Import, ast.ImportFrom)) and not _imports_harness(node):
        for alias in node.names:
            yield alias.asname or alias.name.split(".")[0], node.lineno
    elif isinstance(node, ast.arg):
        yield node.arg, node.lineno
    elif isinstance(node, ast.ExceptHandler) and node.name:
        yield node.name, node.lineno
    elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
        yield node.name, node.lineno
    elif isinstance(node, ast.MatchMapping) and node.rest:
        yield node.rest, node.lineno


def _imports_harness(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module == HARNESS and not node.level
    return any(alias.name == HARNESS for alias in node.names)


def _global_rebindings(tree, protected):
    """Rebinding a name taken from prepare at module level (or via `global`) changes what train.py runs with
    while looking like the harness's value; a local variable of the same name in a function is fine."""
    finder = _GlobalBindings()
    finder.visit(tree)
    for name, line in finder.found:
        if name in protected:
            yield line, (f"rebinds `{name}`, which comes from {HARNESS}: the harness's names are fixed; "
                         "give your own value a new name")


class _GlobalBindings(ast.NodeVisitor):
    """Collects the bindings that land in train.py's module namespace, following Python's scoping rules."""

    def __init__(self):
        self.found = []
        self.declared = None  # names declared `global` in the function being visited; None at module level

    def _bind(self, name, line):
        if self.declared is None or name in self.declared:
            self.found.append((name, line))

    def _scope(self, node, body):
        """Visit a function or class body, where only names declared `global` reach the module."""
        saved = self.declared
        self.declared = {n for sub in ast.walk(node) if isinstance(sub, ast.Global) for n in sub.names}
        for child in body:
            self.visit(child)
        self.declared = saved

    def generic_visit(self, node):  # imports, `except ... as`, match captures
        for name, line in _bound_names(node):
            self._bind(name, line)
        super().generic_visit(node)

    def visit_Name(self, node):
        if not isinstance(node.ctx, ast.Load):
            self._bind(node.id, node.lineno)

    def visit_FunctionDef(self, node):
        self._bind(node.name, node.lineno)
        for expr in [*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults)]:
            self.visit(expr)  # evaluated in the enclosing scope
        self._scope(node, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._bind(node.name, node.lineno)
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._scope(node, node.body)

    def visit_Lambda(self, node):
        for expr in [*node.args.defaults, *filter(None, node.args.kw_defaults)]:
            self.visit(expr)
        self._scope(node, [node.body])

    def visit_comprehension(self, node):
        for expr in [node.iter, *node.ifs]:  # the loop target is local to the comprehension
            self.visit(expr)


def _harness_mutations(tree, protected):
    """Assigning to, deleting or setattr-ing attributes/items of prepare or anything imported from it."""
    for node in ast.walk(tree):
        target = None
        if isinstance(node, (ast.Attribute, ast.Subscript)) and not isinstance(node.ctx, ast.Load):
            target = node
        elif isinstance(node, ast.Attribute) and node.attr == "__dict__":
            target = node
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("setattr", "delattr", "vars", "__setattr__", "__delattr__"):
                target = next((a for a in [getattr(func, "value", None), *node.args[:1]]
                               if a is not None and _root(a) in protected), None)
        if target is not None and _root(target) in protected:
            yield node.lineno, (f"modifies `{ast.unparse(target)}` from {HARNESS}: the harness is frozen; "
                                "keep your own settings in train.py's own variables")


def _root(expr) -> str | None:
    """The name an attribute/subscript chain starts from: `prepare` for prepare.PROFILE.max_seq_len[0]."""
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def _server_settings(tree):
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and node not in docstrings:
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            for word in SERVER_SETTINGS:
                if word in text:
                    yield node.lineno, (f"mentions {word}: the server sets the profile, dataset, budget and result "
                                        f"file, and only {HARNESS}.{METRIC} writes the result; use the constants "
                                        f"from {HARNESS} (PROFILE, MAX_SEQ_LEN, TIME_BUDGET, ...) instead")


def _docstrings(tree) -> set:
    """Docstrings may document the environment variables; they never run."""
    return {node.body[0].value for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _harness_writes(tree, modules):
    """open(..., "w"), Path.write_text, os.remove, shutil.copy... aimed at prepare.py (directly, through a
    variable holding its path, or through prepare.__file__)."""
    paths = _harness_path_names(tree, modules)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        receiver = [func.value] if isinstance(func, ast.Attribute) else []
        if name in CONTENT_WRITERS:
            targets = receiver
        elif name in COPIES:
            targets = node.args[1:2] + [k.value for k in node.keywords if k.arg == "dst"]
        elif name in FILE_MUTATORS:
            targets = [*receiver, *node.args, *(k.value for k in node.keywords)]
        else:
            continue
        if not any(_mentions_harness(t, modules, paths) for t in targets):
            continue
        if name == "open" and not _writes([*node.args, *(k.value for k in node.keywords)]):
            continue
        yield node.lineno, (f"writes to {HARNESS_FILE} ({ast.unparse(func)}): the harness is frozen and pinned; "
                            "a changed prepare.py fails the run")


def _harness_path_names(tree, modules) -> set:
    """Variables assigned an expression that mentions prepare.py (followed through chains of assignments)."""
    assignments = [(node.targets if isinstance(node, ast.Assign) else [node.target], node.value)
                   for node in ast.walk(tree)
                   if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None]
    paths = set()
    while True:
        found = {t.id for targets, value in assignments if _mentions_harness(value, modules, paths)
                 for t in targets if isinstance(t, ast.Name)}
        if found <= paths:
            return paths
        paths |= found


def _mentions_harness(expr, modules, paths) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and HARNESS_FILE in node.value:
            return True
        if isinstance(node, ast.Name) and node.id in paths:
            return True
        if isinstance(node, ast.Attribute) and node.attr == "__file__" and _root(node.value) in modules:
            return True
    return False


def _writes(arguments) -> bool:
    """Whether an open() call's mode or flags ask for writing. An unknown (computed) mode counts as reading."""
    for arg in arguments:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value and \
                set(arg.value) <= set("rwxabt+U") and set(arg.value) & set("wxa+"):
            return True
        if any(isinstance(n, ast.Attribute) and n.attr in WRITE_FLAGS for n in ast.walk(arg)):
            return True
    return False
