"""A real model over a corpus larger than its window: the 0.5B (target and drafter) made to read
2048 positions, over pages 11-16 of R-data.pdf, so the corpus takes several windows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.config import Limits
from app.pipeline import Engine, answer_once
from tests.ui_helpers import R_DATA, real_settings, small_model

pytestmark = pytest.mark.real_models
QUESTION = "Which function reads files in fixed width format?"  # R-data.pdf page 15


def pages(dest: Path, first: int, last: int) -> Path:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(R_DATA).pages[first - 1 : last]:
        writer.add_page(page)
    with dest.open("wb") as out:
        writer.write(out)
    return dest


def test_a_real_question_reads_its_window_and_rapid_returns_lc_tokens(tmp_path: Path) -> None:
    settings = replace(real_settings(tmp_path / "home", small_model(), 0, max_new_tokens=24),
                       limits=Limits(max_new_tokens=24))
    engine = Engine(settings, log=lambda _: None)
    model = engine.target.model
    model.args = replace(model.args, max_positions=2048)  # a small window, so a few pages overflow it
    index = engine.open_index(tmp_path / "index")
    engine.ingest(index, [pages(tmp_path / "R-data-p11-16.pdf", 11, 16)], progress=False)
    windows = engine.windows(index)
    assert len(windows) >= 2 and all(not part.whole for w in windows for part in w.parts)
    holding = [w.number for w in windows for part in w.parts
               if part.first_page is not None and part.first_page <= 5 <= (part.last_page or 0)]  # page 15
    lc = answer_once(engine, QUESTION, index, replace(settings.decoding, method="lc", eta=0.0))
    rapid = answer_once(engine, QUESTION, index, replace(settings.decoding, method="rapid", eta=0.0))
    # The target drafting from its own slots of the retrieved passages, in a window of cut pages.
    focus = answer_once(engine, QUESTION, index, replace(settings.decoding, method="rapid-focus", eta=0.0))
    assert lc.reading is not None and lc.reading.window in holding
    assert lc.reading.label == windows[lc.reading.window - 1].label()
    assert "read.fwf" in lc.answer, lc.answer
    assert rapid.answer == lc.answer and rapid.stats.drafted > 0
    assert focus.answer == lc.answer and focus.stats.drafted > 0
    assert 0 < focus.stats.draft_context_tokens < lc.stats.context_tokens
    assert lc.stats.prefix_cached_tokens == rapid.stats.prefix_cached_tokens > 0  # prefilled at ingest
    # The page-15 source shows its sentences about fixed-width files, not the chunk's opening.
    assert any(c.page == 5 and "Fixed-width-format files" in c.excerpt for c in lc.citations), lc.citations
