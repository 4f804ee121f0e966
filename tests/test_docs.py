"""The README and docs/ cannot drift from the code: every `file.py:name` they name is defined in that file (not
merely imported there), every link leads somewhere, and no committed file holds the absolute path of the machine
that made it."""

import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACE = re.compile(r"\b(\w+)\.py:([A-Za-z_](?:[\w.]*\w)?)")   # train.py:train_step, model.py:ChatTokenizer.chat


def pages():
    return ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                  if f.endswith(".md"))


def defined(tree):
    """The names a module defines at its top level (functions, classes, assignments), each class with its own
    (methods, fields, class attributes): {name: {member, ...}}. What it imports is not among them."""
    names = {}

    def targets(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []
    for node in tree.body:
        for name in targets(node):
            names[name] = {m for child in getattr(node, "body", []) if isinstance(node, ast.ClassDef)
                           for m in targets(child)}
    return names


def broken_places(text, root=ROOT):
    """Every `file.py:name` of a text that does not name a definition in that file, as 'file.py:name (why)'."""
    broken, cache = [], {}
    for module, name in sorted(set(PLACE.findall(text)) - {("file", "function")}):   # the notation itself
        path = os.path.join(root, module + ".py")
        if not os.path.isfile(path):
            broken.append(f"{module}.py:{name} (no file {module}.py)")
            continue
        if path not in cache:
            with open(path) as f:
                cache[path] = defined(ast.parse(f.read()))
        top, *rest = name.split(".")
        if top not in cache[path]:
            broken.append(f"{module}.py:{name} ({top} is not defined in {module}.py)")
        elif rest and rest[0] not in cache[path][top]:
            broken.append(f"{module}.py:{name} ({rest[0]} is not defined in {top})")
    return broken


def test_every_place_the_readme_and_docs_name_is_defined_there():
    for page in pages():
        with open(os.path.join(ROOT, page)) as f:
            assert broken_places(f.read()) == [], page
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    reading = readme.split("## Read the method")[1].split("\n## ")[0]
    assert len(set(PLACE.findall(reading))) >= 10   # the reading order is made of places
    assert len(readme.splitlines()) <= 200          # a front page


def test_a_moved_or_imported_name_is_named_as_broken():
    # train.py imports check_shares from parallel.py: named there, it is not defined there
    assert broken_places("`train.py:check_shares` and `parallel.py:check_shares`") == \
        ["train.py:check_shares (check_shares is not defined in train.py)"]
    assert broken_places("`train.py:Graded.advantages`, `train.py:Graded.grading`") == []   # a method, a field
    assert broken_places("`train.py:Graded.nothing`, `nowhere.py:x`") == \
        ["nowhere.py:x (no file nowhere.py)", "train.py:Graded.nothing (nothing is not defined in Graded)"]


def test_every_link_of_the_readme_and_docs_leads_somewhere():
    for page in pages():
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)#]+)\)", text):   # files, folders and images, relative to the page
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), link)), f"{page}: {link}"


def test_no_committed_file_holds_the_absolute_path_of_a_machine():
    """Committed results move between checkouts: an absolute path of the machine that wrote them (its home, a
    temporary folder, the checkout itself) names nothing elsewhere."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    absolute = re.compile(rb"(?<![\w.~/])/(?:home|root|work|tmp|Users|mnt|opt|srv|var)/[\w.-]+")
    found = []
    for name in files.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.isfile(path) and not name.endswith(".png"):
            with open(path, "rb") as f:
                found += [f"{name}: {m.decode()}" for m in absolute.findall(f.read())]
    assert found == [], found[:10]
