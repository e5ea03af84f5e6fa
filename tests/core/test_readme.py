"""README.md stays a five-minute read that points into docs/: at most 250 lines, and every relative link it gives
(a file, and the heading an anchor names) exists. The docs pages' own links are checked by `mkdocs build --strict`."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set:
    """Heading ids as mkdocs' toc makes them: an explicit ``{#id}``, else the heading's slug."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        if explicit:
            found.add(explicit.group(1))
        else:
            words = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
            found.add(re.sub(r"[\s]+", "-", words))
    return found


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_is_short():
    assert len(_readme().splitlines()) <= 250


def test_readme_links_resolve():
    relative = [t for t in LINK.findall(_readme()) if not t.startswith(("http://", "https://"))]
    assert any(t.startswith("docs/") for t in relative)
    for target in relative:
        path, _, anchor = target.partition("#")
        full = os.path.join(ROOT, path)
        assert os.path.exists(full), target
        if anchor:
            with open(full, encoding="utf-8") as f:
                assert anchor in _anchors(f.read()), target
