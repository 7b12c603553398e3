"""Makes python-functional-howto.docx from Python 3.11's "Functional Programming HOWTO" (HTML).

No DOCX documentation ships in Debian, so the set's Word document is made from another document's
text: the HTML page of Debian's python3.11-doc (/usr/share/doc/python3.11/html/howto/functional.html),
read by the project's own HTML reader, one Word heading per HTML heading, one paragraph per other line.
Sphinx's navigation boxes are left out. The PSF licence notice travels with it (data/qaset/NOTICES.md).

    python data/qaset/make_docx.py PATH/TO/functional.html data/qaset/python-functional-howto.docx
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import docx
from bs4 import BeautifulSoup

from retrieval.readers import read_document

NAVIGATION = {"Table of Contents", "Previous topic", "Next topic", "This Page", "Navigation", "Quick search"}
HEADING = re.compile(r"^(#{1,6}) (.+)$")


def main(html: Path, out: Path) -> None:
    # The reader writes headings as "# title" lines, and so reads code comments; only real ones count.
    soup = BeautifulSoup(html.read_bytes(), "html.parser")
    titles = {h.get_text(" ", strip=True) for h in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"])}
    document = docx.Document()
    document.core_properties.title = "Functional Programming HOWTO (Python 3.11)"
    for page in read_document(html, 10**8):
        if page.section in NAVIGATION:
            continue
        for line in page.text.split("\n"):
            heading = HEADING.match(line)
            if heading and heading.group(2) in titles:
                document.add_heading(heading.group(2).replace("¶", "").strip(), level=len(heading.group(1)))
            elif line.strip():
                document.add_paragraph(line.replace("¶", ""))
    document.save(str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
