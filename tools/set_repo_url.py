"""Make every chapter's REPO_URL agree with `repository: url:` in _config.yml.

In a fork: edit the URL in _config.yml, then run `python tools/set_repo_url.py`.
"""
import json
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
url = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", (root / "_config.yml").read_text(), re.M).group(1)
pattern = re.compile(r'REPO_URL = "[^"]*"')
for path in sorted((root / "book").glob("*.ipynb")) + [root / "tools" / "chapter_template.ipynb"]:
    nb = json.loads(path.read_text())
    changed = False
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        new = pattern.sub(f'REPO_URL = "{url}"', src)
        if new != src:
            cell["source"] = new.splitlines(keepends=True)
            changed = True
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print("updated", path.relative_to(root))
print("REPO_URL =", url)
