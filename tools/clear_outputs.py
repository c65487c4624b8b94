#!/usr/bin/env python3
"""Strip outputs, execution counts and saved widget state from notebooks before committing.

    python tools/clear_outputs.py book/*.ipynb

The book build executes every notebook, so committed notebooks carry no outputs
(tests/test_book_config.py checks). Cell ids, tags and other metadata are kept.
"""
import json
import sys
from pathlib import Path


def clear(path: Path) -> bool:
    text = path.read_text()
    nb = json.loads(text)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell.get("metadata", {}).pop("execution", None)
    nb["metadata"].pop("widgets", None)
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if clear(Path(arg)):
            print(f"cleared {arg}")
