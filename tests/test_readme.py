"""The README's reading order names real places: every `file.py:function` it points to exists."""

import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_place_the_readme_names_exists():
    text = open(os.path.join(ROOT, "README.md")).read()
    places = set(re.findall(r"`(\w+)\.py:([\w.]+)`", text)) - {("file", "function")}   # the notation itself
    reading = text.split("## Read the method")[1].split("\n## ")[0]
    assert len(set(re.findall(r"`(\w+)\.py:([\w.]+)`", reading))) >= 10
    for module, name in sorted(places):
        obj = importlib.import_module(module)
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {module}.py:{name}, which does not exist"
            obj = getattr(obj, part)
    assert len(text.splitlines()) <= 200


def test_every_link_of_the_readme_and_docs_leads_somewhere():
    pages = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]
    for page in pages:
        text = open(os.path.join(ROOT, page)).read()
        for link in re.findall(r"\]\(([^)#]+)\)", text):   # files, folders and images, relative to the page
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), link)), f"{page}: {link}"
