"""The real app in headless Chromium: upload a PDF, ask, watch the answer stream with sources and stats."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.events import Preparing
from app.presets import FAST, PASSAGES
from tests.ui_helpers import (
    ARTIFACTS,
    EXPECTED,
    QUESTION,
    ScriptedEngine,
    bad_files,
    chromium,
    free_port,
    real_settings,
    serving,
    small_model,
    small_pdf,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ANSWER_TIMEOUT_MS = 150_000  # a 2-core CPU shared with benchmarks: prefill alone can take 30 s


# Records every text an element shows, so the test sees the stream itself however fast it goes
# (polling the final page could not tell a streamed answer from one that arrived all at once).
RECORD_TEXTS = """selectors => {
    window.__texts = {};
    for (const selector of selectors) {
        const element = document.querySelector(selector);
        const seen = window.__texts[selector] = [element.innerText];
        new MutationObserver(() => {
            const text = element.innerText;
            if (seen[seen.length - 1] !== text) seen.push(text);
        }).observe(element, {subtree: true, childList: true, characterData: true});
    }
}"""


def ask(page: Page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def upload(page: Page, *paths: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])


@pytest.mark.real_models
def test_upload_ask_and_watch_the_answer(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from app.events import STILL_READING
    from app.pipeline import Engine
    from ui.blocks import build_app

    model = small_model()
    # A home of its own: the documents' first read is cold, so the first question is asked during it.
    settings = real_settings(tmp_path / "home", model, free_port(), max_new_tokens=24)
    pdf = small_pdf(tmp_path / "R-data-p1-3.pdf")
    bad = bad_files(tmp_path / "bad")
    with serving(build_app(Engine(settings), tmp_path / "index"), settings) as url, \
            chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        chat, stats, status, documents = (page.locator(s) for s in ("#chat", "#stats", "#upload-status", "#documents"))
        expect(documents).to_contain_text("No documents indexed yet")

        # Asking before any upload is a message in the chat, not a traceback.
        ask(page, QUESTION)
        expect(chat).to_contain_text("No documents are indexed yet", timeout=30_000)
        expect(chat).not_to_contain_text("Traceback")

        upload(page, pdf)
        expect(status).to_contain_text(f"added: {pdf.name}", timeout=60_000)
        expect(documents).to_contain_text(pdf.name)

        # Asked while the documents are read: answered from the passages at once, labelled so, with
        # a button that asks again once the documents are read.
        ask(page, QUESTION)
        expect(stats).to_contain_text("Answer complete", timeout=ANSWER_TIMEOUT_MS)
        answers = page.locator("#chat [data-testid=bot]")
        expect(answers.last).to_contain_text(STILL_READING[1:])
        again = page.locator("#ask-again")
        expect(again).to_be_visible(timeout=10_000)
        expect(again).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)

        page.evaluate(RECORD_TEXTS, ["#chat", "#stats"])
        again.click()
        expect(answers).to_have_count(3, timeout=30_000)  # the "no documents" message, the early answer, this
        expect(stats).not_to_contain_text("Answer complete", timeout=30_000)
        expect(stats).to_contain_text("Answer complete", timeout=ANSWER_TIMEOUT_MS)
        answer = answers.last.inner_text()
        assert STILL_READING[1:] not in answer
        assert EXPECTED in answer, answer
        assert re.search(rf"{re.escape(pdf.name)}, p\. [123]\b", answer), answer
        panel = stats.inner_text()
        assert re.search(r"Acceptance rate\s+\d+(\.\d)?%", panel), panel
        assert re.search(r"Decode speed\s+\d+\.\d\d tokens/s", panel), panel
        assert re.search(r"Speedup over LC decoding\s+\S.*\(", panel), panel  # a figure or n/a, with its basis
        expect(page.locator("#pass-plot")).to_contain_text("target pass")
        # Streaming: answer text was on screen while the model was still generating, and the panel
        # showed statistics of an unfinished answer.
        seen = page.evaluate("() => window.__texts")
        assert any(re.search(r"\S\s*\n+Generating…", text) for text in seen["#chat"]), seen["#chat"]
        assert any("Generating…" in text and "Acceptance rate" in text for text in seen["#stats"]), seen["#stats"]

        # Bad files: one clear line each, and the document list still holds the good PDF.
        upload(page, bad["corrupt"], bad["exe"], bad["empty"])
        expect(status).to_contain_text("corrupt.pdf", timeout=60_000)
        lines = status.inner_text()
        assert re.search(r"not indexed: corrupt\.pdf — .*damaged", lines), lines
        assert re.search(r"not indexed: setup\.exe — unsupported file type '\.exe'", lines), lines
        assert re.search(r"not indexed: empty\.txt — the file is empty", lines), lines
        assert "Traceback" not in lines
        expect(documents).to_contain_text(pdf.name)
        expect(documents).to_contain_text("1 document,")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)


def test_delete_and_errors_without_models(tmp_path: Path) -> None:
    """The page's own logic against a scripted engine: delete control, unexpected errors, compare."""
    from playwright.sync_api import expect

    from ui.blocks import build_app

    engine = ScriptedEngine(tmp_path / "home")
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe manual is for R version 4.2.2.\n")
    with serving(build_app(engine), engine.settings) as url, chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        chat, stats, documents = page.locator("#chat"), page.locator("#stats"), page.locator("#documents")
        upload(page, notes)
        expect(page.locator("#upload-status")).to_contain_text("added: notes.md", timeout=30_000)

        # The engine's background work for the documents shows under the list, as a bar with an ETA.
        preparing = page.locator("#preparing")
        engine.now_preparing = Preparing("Reading documents", 4096, 20614, 71.0, 213.0)
        expect(preparing).to_contain_text("Reading documents: 4,096 / 20,614 tokens (20%)", timeout=10_000)
        expect(preparing).to_contain_text("about 3 min 33 s left")
        assert preparing.locator("progress").get_attribute("value") == "4096"
        engine.now_preparing = None
        expect(preparing).not_to_contain_text("Reading documents", timeout=10_000)

        ask(page, "boom")
        expect(chat).to_contain_text("Something went wrong on the server", timeout=30_000)
        expect(chat).not_to_contain_text("secret internal detail")

        # The passages mode sets the method and its knobs; the next question is asked with them.
        page.get_by_label(PASSAGES.label).check()
        ask(page, "Which version, carefully?")
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        decoding = engine.questions[-1][1]
        assert (decoding.method, decoding.eta, decoding.gamma) == (PASSAGES.method, PASSAGES.eta, PASSAGES.gamma)
        page.get_by_label(FAST.label).check()

        page.locator("#compare input[type=checkbox]").check()
        ask(page, "Which version?")
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        expect(stats).to_contain_text("1.50× (measured side by side on this input)")
        expect(chat).to_contain_text("manual.pdf, p. 2")
        # Document text is shown as text: markup in an excerpt is not rendered.
        expect(chat).to_contain_text("<b>Patched</b>")
        assert engine.questions[-1][2] is True

        # Stop: the answer so far stays, marked as stopped, and the engine's generator is closed.
        page.locator("#compare input[type=checkbox]").uncheck()
        ask(page, "slow question")
        expect(chat).to_contain_text("Generating…", timeout=30_000)
        page.locator("#stop").click()
        expect(chat).to_contain_text("Stopped.", timeout=30_000)
        expect(stats).to_contain_text("Stopped.")
        assert wait_until(lambda: engine.finished == len(engine.questions), 10)
        assert "The manual" in page.locator("#chat [data-testid=bot]").last.inner_text()

        page.locator("#delete-choice input").click()
        page.get_by_role("option", name="notes.md").click()
        page.locator("#delete").click()
        expect(page.locator("#delete-status")).to_contain_text("deleted notes.md", timeout=30_000)
        expect(documents).to_contain_text("No documents indexed yet")


def test_new_chat_and_a_citation_opening_its_page(tmp_path: Path) -> None:
    """A follow-up carries the conversation, "New chat" clears it; a source opens its PDF page, marked."""
    import io

    from PIL import Image
    from playwright.sync_api import expect

    from app.conversation import Turn
    from ui.blocks import build_app

    engine = ScriptedEngine(tmp_path / "home")
    pdf = small_pdf(tmp_path / "manual.pdf")  # the scripted answer cites manual.pdf, page 2
    with serving(build_app(engine), engine.settings) as url, chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        chat, stats = page.locator("#chat"), page.locator("#stats")
        upload(page, pdf)
        expect(page.locator("#upload-status")).to_contain_text("added: manual.pdf", timeout=30_000)

        ask(page, "What version?")
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        ask(page, "And its date?")
        expect(chat).to_contain_text("Searched for: “And its date? (after: What version?)”", timeout=30_000)
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        assert engine.histories[-1] == (Turn("What version?", "".join(ScriptedEngine.ANSWER)),)

        # The latest answer's source, opened: its page, rendered, with the excerpt marked.
        page.get_by_label("1. manual.pdf, p. 2").check()
        expect(page.locator("#source-note")).to_contain_text("the cited excerpt is marked", timeout=30_000)
        image = page.locator("#source-page img")
        expect(image).to_be_visible()
        shot = Image.open(io.BytesIO(image.screenshot())).convert("RGB")
        marked = sum(1 for r, g, b in shot.getdata() if r > 230 and 200 < g < 245 and b < 170)
        assert marked > 200, marked

        page.locator("#new-chat").click()
        expect(chat).not_to_contain_text("What version?", timeout=10_000)
        expect(page.locator("#source-page img")).to_have_count(0)
        ask(page, "Which version?")
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        assert engine.histories[-1] == ()
        expect(chat).not_to_contain_text("Searched for")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-new-chat.png"), full_page=True)


def test_an_answer_while_the_documents_are_read_offers_to_ask_again(tmp_path: Path) -> None:
    """An answer given from the passages while the documents are read says so, and a button asks the
    same question again once they are read (the conversation then continues from the new answer)."""
    from playwright.sync_api import expect

    from app.events import STILL_READING
    from ui.blocks import build_app

    engine = ScriptedEngine(tmp_path / "home")
    engine.ready = False
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe manual is for R version 4.2.2.\n")
    with serving(build_app(engine), engine.settings) as url, chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(url)
        chat, stats, again = page.locator("#chat"), page.locator("#stats"), page.locator("#ask-again")
        upload(page, notes)
        expect(page.locator("#upload-status")).to_contain_text("added: notes.md", timeout=30_000)
        expect(again).to_be_hidden()

        ask(page, "An early question?")
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        last = page.locator("#chat [data-testid=bot]").last
        expect(last).to_contain_text(STILL_READING[1:], timeout=10_000)
        expect(again).to_be_visible(timeout=10_000)
        expect(again).to_be_disabled()  # the documents are still being read
        expect(again).to_contain_text("still being read")

        engine.ready = True  # the read is done: the page's poll enables the button
        expect(again).to_be_enabled(timeout=10_000)
        again.click()
        expect(page.locator("#chat [data-testid=bot]")).to_have_count(2, timeout=30_000)
        expect(stats).to_contain_text("Answer complete", timeout=30_000)
        assert engine.questions[-1][0] == "An early question?"
        assert engine.histories[-1] == ()  # asked again in place of the early answer, not as a follow-up
        expect(page.locator("#chat [data-testid=bot]").last).not_to_contain_text(STILL_READING[1:])
        expect(again).to_be_hidden(timeout=10_000)
        expect(chat).to_contain_text("version 4.2.2")
