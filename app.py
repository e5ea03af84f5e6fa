"""AnyStory demo: several subjects from reference photos in one image, and storyboards (``python app.py``).

This file only wires Gradio components to the functions of ``anystory.app`` (models, generation, the two tabs'
glue, inputs, storyboard, visualisation); those hold the logic and are what the tests call.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import shutil
import sys
import tempfile
from types import SimpleNamespace

import gradio as gr

from anystory.app import generate_tab, storyboard_run, storyboard_tab
from anystory.app.jobs import SessionJobs, one_job_per_session
from anystory.app.retention import (DEFAULT_RETENTION_S, RETENTION_ENV, SessionFiles, anonymize_uploads, private_root,
                                    retention_seconds)
from anystory.app.background import background_controls
from anystory.app.gallery import captioned, frame_items, routing_items
from anystory.app.editor_limits import LimitedEditor
from anystory.app.environment import probe_environment
from anystory.app.generation import GenerationError
from anystory.app.inputs import MAX_UPLOAD_MB, MAX_SEED, SubjectSlot, check_number, random_seed, subject_count
from anystory.app.models import KINDS, ModelHandle, NoModelError, load_model
from anystory.app.progress import Cancelled, StagedSegmenter, Status, follow
from anystory.app.raw_numbers import raw_number
from anystory.app.mask_preview import preview as mask_preview
from anystory.matting import BIREFNET_ID, LazyBiRefNetSegmenter
from anystory.app.region_canvas import drawn_region_text, region_canvas, typed_box
from anystory.app.storyboard import import_script
from anystory.app.upload_image import UploadImage, editor_background
from anystory.app.visualize import PALETTE
from anystory.cli_options import add_vram
from anystory.errors import InvalidInputError

try:  # Hugging Face Spaces (ZeroGPU): ask for a GPU only while generating
    import spaces

    gpu = spaces.GPU(duration=180)
except ImportError:
    def gpu(fn):
        return fn

#: A login for the whole demo, ``user:password[,user:password]`` (a Space secret); --auth wins.
AUTH_ENV = "ANYSTORY_AUTH"
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "examples")
#: What the user can act on (bad input, or advice such as running out of memory): shown as a message. Any other
#: exception is a bug: logged with its traceback and reported as one (see :func:`_report_bug`).
USER_ERRORS = (InvalidInputError, GenerationError)
LOG = logging.getLogger("anystory.app")
#: Each slot's region canvas draws in that slot's colour.
REGION_COLORS = ["#%02x%02x%02x" % c for c in PALETTE]


EXAMPLE_STORY = os.path.join(EXAMPLES_DIR, "storyboard.yaml")
#: Gallery captions sit below their picture (Gradio lays them over its bottom corner, where they hid much of a small
#: routing map) and wrap instead of being cut to one line. Gradio's own timer over the progress line is hidden: its
#: ETA is the average of earlier runs (any settings); the line itself gives this run's.
CSS = """
:is(#story-frames, #output-gallery, #routing-gallery, #story-routes) .thumbnail-item {
    display: flex; flex-direction: column; aspect-ratio: auto; height: auto; }
:is(#story-frames, #output-gallery, #routing-gallery, #story-routes) .thumbnail-item > img {
    aspect-ratio: 1; height: auto; min-height: 0; flex: none; }
:is(#story-frames, #output-gallery, #routing-gallery, #story-routes) .caption-label {
    position: static; white-space: normal; max-width: 100%; border: none; border-radius: 0;
    border-top: 1px solid var(--border-color-primary); }
#run-progress .wrap, #story-progress .wrap { display: none !important; }
"""
#: The editor selects its crop tool whenever it receives an image, so strokes did nothing until the user found the
#: Brush: after each new image, press the editor's brush button (by its accessible name) once it is there.
SELECT_BRUSH_JS = """
(...args) => {
  const id = "%s";
  const press = (tries) => {
    const root = document.getElementById(id);
    const brush = root && [...root.querySelectorAll("button")].find(b =>
        /brush|draw/i.test((b.getAttribute("aria-label") || "") + " " + (b.title || "")));
    if (brush) { brush.click(); } else if (tries > 0) { setTimeout(() => press(tries - 1), 250); }
  };
  setTimeout(() => press(20), 300);
  return args;
}
"""
#: Lets the page lay out a section just opened before a component inside it receives a value.
#: Wait until the opened section's editor canvas has a size (a busy browser lays it out late), then a little more;
#: at most 10 s. %s: the editor's elem_id.
WAIT_FOR_LAYOUT_JS = """() => new Promise(done => {
  const start = Date.now();
  const tick = () => {
    const canvas = document.querySelector('#%s canvas');
    const box = canvas && canvas.getBoundingClientRect();
    if ((box && box.width > 0 && box.height > 0) || Date.now() - start > 10000) setTimeout(done, 400);
    else setTimeout(tick, 50);
  };
  tick();
})"""
SLIDER_HELP = {
    "scale": "How strongly the subject's identity (CLIP + QFormer tokens) steers the picture; 0 turns it off.",
    "reference_scale": "How much fine detail is copied from the reference (ReferenceNet); lower it if the subject "
                       "looks pasted in.",
    "steps": "Denoising steps: more is slower and usually cleaner.",
    "guidance": "How closely the picture follows the prompt (classifier-free guidance); too high looks harsh.",
    "width": "Output width in pixels (the model's native size is the default).",
    "height": "Output height in pixels (the model's native size is the default).",
    "num_images": "Images per run, each with its own routing overlay.",
    "story_steps": "Denoising steps for every frame of the story.",
}


def _ex(name):
    return os.path.join(EXAMPLES_DIR, name)


STAR, MOON, HEART, TRIANGLE = (_ex(f"{n}.png") for n in ("red_striped_star", "blue_dotted_moon", "yellow_dotted_heart",
                                                         "orange_striped_triangle"))
#: [subjects, subject 1's mask, subject 1..4 images, prompt, seed]; each row is reproducible (fixed seed). Subjects
#: and backdrops of the miniature's world, so the miniature can draw them.
EXAMPLES = [
    [1, None, STAR, None, None, None, "a red striped star on clay", 1],
    [2, None, STAR, MOON, None, None, "a red striped star and a blue dotted moon on sand", 7],
    [2, _ex("green_checkered_square_mask.png"), _ex("green_checkered_square.png"), STAR, None, None,
     "a green checkered square and a red striped star on snow", 3],
    [3, None, STAR, MOON, HEART, None, "a red striped star, a blue dotted moon and a yellow dotted heart on sand", 11],
    [4, None, STAR, MOON, HEART, TRIANGLE, "four objects on stone: a star, a moon, a heart and a triangle", 21],
]
#: Said in the UI: what the miniature was trained on bounds what its examples can show (docs/experiments/miniature.md).
EXAMPLES_LABEL = ("Examples: 1 to 4 subjects of the miniature's synthetic world, each with a fixed seed (the miniature "
                  "was trained on scenes of up to 3 subjects: with 4 it often loses one)")
#: Photos (public-domain / CC0, from scikit-image): for SDXL or FLUX weights; the miniature never saw a photo.
PHOTO_EXAMPLES = [
    [2, None, _ex("astronaut.png"), _ex("cat.png"), None, None, "an astronaut holding a cat in a garden", 5],
    [2, None, _ex("cat.png"), _ex("coffee.png"), None, None, "a cat next to a cup of coffee on a wooden table", 9],
]


def _canvas_region(value):
    """A drawing fills the Region field in; an empty canvas leaves what the user typed."""
    text = drawn_region_text(value)
    return gr.skip() if text is None else text


def _refuse(error: Exception, n_outputs: int, title: str = "Cannot generate", status_at: int | None = None):
    """Show the problem and leave every output as it was (a raised gr.Error would cover earlier results); with
    ``status_at``, that output (a status line) says it too, so it stays on the page after the toast is closed."""
    gr.Warning(str(error), title=title, duration=None)
    return _with_status([gr.skip()] * n_outputs, status_at, f"**{title}:** {error}")


def _report_bug(error: Exception, n_outputs: int, status_at: int | None = None):
    """A programming error: logged with its traceback, said to be a bug (not the user's input), outputs kept."""
    ref = secrets.token_hex(4)  # the page shows no server internals (paths, values): the log has them under this
    LOG.error("internal error %s while serving a request", ref, exc_info=error)
    message = (f"This is a bug in AnyStory, not a problem with your input ({type(error).__name__}, reference {ref}). "
               "Earlier results are kept; the details are in the server log.")
    gr.Warning(message, title="Internal error", duration=None)
    return _with_status([gr.skip()] * n_outputs, status_at, f"**Internal error:** {message}")


def _with_status(outputs: list, status_at: int | None, text: str):
    if status_at is not None:
        outputs[status_at] = text
    return outputs[0] if len(outputs) == 1 else outputs


def _subject_slot(i: int, visible: bool, d, kept: SessionFiles, segmenter) -> tuple:
    """One subject's card: its upload, mask preview, name and strengths first; the optional Region and "Replace the
    mask" sections start folded so that the first card, the prompt and Generate fit one screen. Returns (group,
    values in ``generate_tab.SLOT_FIELDS`` order, region canvas, Region section)."""
    with gr.Group(visible=visible, elem_id=f"subject-{i + 1}") as group:
        with gr.Row():
            image = UploadImage(label=f"Subject {i + 1}: reference image", type="filepath", image_mode=None,
                                sources=["upload", "clipboard"], height=200, elem_id=f"subject-{i + 1}-image")
            mask_view = gr.Image(label="Mask used (preview)", interactive=False, height=200,
                                 elem_id=f"subject-{i + 1}-mask-preview")
            with gr.Column():
                name = gr.Textbox(label="Name", placeholder=f"subject {i + 1}", elem_id=f"subject-{i + 1}-name")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Semantic strength", info=SLIDER_HELP["scale"])
                ref_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Detail strength",
                                      info=SLIDER_HELP["reference_scale"])
                raw_number(scale), raw_number(ref_scale)  # checked by the app, field named
        mask_note = gr.Markdown(elem_id=f"subject-{i + 1}-mask-note")
        canvas, region, region_box = _region_section(i, d)
        with gr.Accordion("Replace the mask: draw over the subject or upload one", open=False,
                          elem_id=f"subject-{i + 1}-mask-editor") as mask_box:
            with gr.Tab("Draw"):
                drawn = LimitedEditor(label="Paint over the subject (the brush is selected)", type="pil", sources=[],
                                      layers=False, height=300, transforms=[], elem_id=f"subject-{i + 1}-draw",
                                      brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"))
            with gr.Tab("Upload"):
                mask = UploadImage(label="Mask (white = subject, same size as the image)", type="filepath",
                                   image_mode=None, sources=["upload"], height=200, elem_id=f"subject-{i + 1}-mask")

    def on_new_image(request: gr.Request, path):
        kept.claim(request, path)
        return kept.as_files(request, editor_background(path))

    brush_js = SELECT_BRUSH_JS % f"subject-{i + 1}-draw"
    # an editor that receives its image while folded away never reports strokes: a new image opens the section
    # first, then reaches the editor
    image.change(lambda: gr.Accordion(open=True), None, mask_box, queue=False).then(
        None, None, None, js=WAIT_FOR_LAYOUT_JS % f"subject-{i + 1}-draw").then(
        on_new_image, image, drawn, queue=False).then(None, None, None, js=brush_js)

    def on_mask_inputs(request: gr.Request, img, msk, drw, index=i):
        kept.claim(request, img, msk)
        try:
            return kept.as_files(request, mask_preview(SubjectSlot(img, msk, drw), segmenter, index))
        except USER_ERRORS as e:
            return None, f"Mask: {e}"

    # a new image clears the strokes: its preview needs no editor value. The editor's own change events (strokes,
    # and the new image arriving) may meet a half-rewritten upload when several slots load at once (an example):
    # those fail quietly, the next one shows
    def on_image_mask(request: gr.Request, img, msk, index=i):
        return on_mask_inputs(request, img, msk, None, index)

    image.change(on_image_mask, [image, mask], [mask_view, mask_note], trigger_mode="always_last")
    for source in (drawn, mask):
        source.change(on_mask_inputs, [image, mask, drawn], [mask_view, mask_note], trigger_mode="always_last",
                      show_progress="hidden")
    return group, [image, mask, drawn, name, scale, ref_scale, region, canvas], canvas, region_box


def _region_section(i: int, d) -> tuple:
    """The folded Region section: a canvas of the output's shape in the slot's colour, the typed box under it.
    Stacked, not side by side: beside the field the editor sized its drawing surface to the whole row and showed
    only the middle of it (half the grid at 1400 px)."""
    with gr.Accordion("Region (optional): where this subject may appear", open=False,
                      elem_id=f"subject-{i + 1}-region-box") as box:
        canvas = LimitedEditor(value=region_canvas(d.size, d.size), label="Draw a box (the output's shape)",
                               type="pil", sources=[], layers=False, height=260, transforms=[],
                               elem_id=f"subject-{i + 1}-region-canvas",
                               brush=gr.Brush(colors=[REGION_COLORS[i % len(REGION_COLORS)]], color_mode="fixed"))
        region = gr.Textbox(label="Region (x0, y0, x1, y1)", placeholder="anywhere",
                            info="A box in fractions of the output, e.g. 0, 0, 0.5, 1 = the left half. Drawing "
                                 "fills it in; typed text wins; the canvas shows the box.",
                            elem_id=f"subject-{i + 1}-region")
    # input: the user's strokes (a canvas with a value from the start sends no change for them); a canvas remade
    # for a new output size leaves the field alone
    canvas.input(_canvas_region, canvas, region, trigger_mode="always_last", show_progress="hidden")
    return canvas, region, box


def _subject_count_controls(n_slots: int, count, groups) -> None:
    """"+ Add subject" / "- Remove last subject": the hidden count shows that many cards."""
    with gr.Row():
        add_btn = gr.Button("+ Add subject", size="sm", elem_id="add-subject")
        remove_btn = gr.Button("- Remove last subject", size="sm", elem_id="remove-subject")
    limit_note = f"Subject limit reached: this model takes at most {n_slots} subjects per image."

    def _add(c):
        if subject_count(c, n_slots) >= n_slots:
            gr.Info(limit_note, title="Subject limit")
        return min(n_slots, subject_count(c, n_slots) + 1)

    def _show(c):
        c = subject_count(c, n_slots)
        at_limit = c >= n_slots
        return [gr.Group(visible=i < c) for i in range(n_slots)] + [
            gr.Button(f"Limit: {n_slots} subjects" if at_limit else "+ Add subject")]

    add_btn.click(_add, count, count)
    remove_btn.click(lambda c: max(1, subject_count(c, n_slots) - 1), count, count, queue=False)
    count.change(_show, count, groups + [add_btn], queue=False)


def _settings_section(d) -> list:
    """The folded Settings (negative prompt, seed, steps, guidance, size, images), then the folded background
    reference and its strength: in the handler's order."""
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, minimum=-1, maximum=MAX_SEED, elem_id="seed",
                         info="The same seed and settings give the same image.")
        steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", info=SLIDER_HELP["steps"])
        guidance = gr.Slider(0.0, 15.0, value=d.guidance, step=0.1, label="Guidance", info=SLIDER_HELP["guidance"])
        width = gr.Slider(d.min_size, d.max_size, value=d.size, step=d.size_step, label="Width",
                          info=SLIDER_HELP["width"])
        height = gr.Slider(d.min_size, d.max_size, value=d.size, step=d.size_step, label="Height",
                           info=SLIDER_HELP["height"])
        num_images = gr.Slider(1, 4, value=1, step=1, label="Images", info=SLIDER_HELP["num_images"])
    background, background_start = background_controls()
    for field in (seed, steps, guidance, width, height, num_images, background_start):
        raw_number(field)  # a bad value reaches the app's checks, which name the field
    return [negative, seed, steps, guidance, width, height, num_images, background, background_start]


def _slot_canvas(k: int):
    """Slot ``k``'s canvas for an output size, its Region text and its current value: the typed box drawn on the
    grid, else the strokes scaled along."""
    def remake(w, h, text, value):
        return region_canvas(w, h, value, typed_box(text)[1], PALETTE[k % len(PALETTE)])

    return remake


def _show_typed_regions(width, height, regions, canvases) -> None:
    """The Region field, typed or filled in by a drawing, is shown as a box on its canvas (a half-typed box leaves
    the canvas as it is), and the brush is selected again (a new value selects the editor's crop tool)."""
    for k, (region, canvas) in enumerate(zip(regions, canvases)):
        remake = _slot_canvas(k)

        def on_text(w, h, text, value, remake=remake):
            return remake(w, h, text, value) if typed_box(text)[0] else gr.skip()

        region.change(on_text, [width, height, region, canvas], canvas, trigger_mode="always_last",
                      show_progress="hidden").then(
            None, None, None, js=SELECT_BRUSH_JS % f"subject-{k + 1}-region-canvas")


def _follow_output_shape(demo, n_slots: int, width, height, canvases, regions, boxes) -> None:
    """The region canvases follow the output's shape (the box or strokes along), with the brush selected; opening
    a folded Region section hands its canvas the grid again (one laid out while folded away may show none)."""
    def _reshape(w, h, *values):
        texts, current = values[:n_slots], values[n_slots:]
        return [_slot_canvas(k)(w, h, t, v) for k, (t, v) in enumerate(zip(texts, current))]

    for k, (box, canvas) in enumerate(zip(boxes, canvases)):
        box.expand(_slot_canvas(k), [width, height, regions[k], canvas], canvas, queue=False,
                   show_progress="hidden").then(None, None, None, js=SELECT_BRUSH_JS % f"subject-{k + 1}-region-canvas")

    for size in (width, height):
        reshaped = size.change(_reshape, [width, height] + regions + canvases, canvases, trigger_mode="always_last",
                               show_progress="hidden")
        for k in range(n_slots):
            reshaped = reshaped.then(None, None, None, js=SELECT_BRUSH_JS % f"subject-{k + 1}-region-canvas")
    _show_typed_regions(width, height, regions, canvases)
    for k in range(n_slots):  # drawing works straight away, as on the mask editor
        demo.load(None, None, None, js=SELECT_BRUSH_JS % f"subject-{k + 1}-region-canvas")


def _generate_tab(demo, handle: ModelHandle, segmenter, kept: SessionFiles, jobs: SessionJobs, matting_status):
    """Subjects and settings on the left; prompt, Generate and the results right beside them (one screen at
    1280x800). Returns the heavy handler."""
    n_slots, d = max(1, handle.max_subjects), handle.defaults
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            # a hidden number, not a State, so that the examples can set how many subjects they use
            count = gr.Number(min(2, n_slots), visible=False, precision=0, label="Subjects", elem_id="subject-count")
            raw_number(count)
            groups, slot_inputs, canvases, boxes = [], [], [], []
            for i in range(n_slots):
                group, values, canvas, region_box = _subject_slot(i, i < min(2, n_slots), d, kept, segmenter)
                groups.append(group)
                slot_inputs += values
                canvases.append(canvas)
                boxes.append(region_box)
            _subject_count_controls(n_slots, count, groups)
            settings = _settings_section(d)
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                placeholder="e.g. a red striped star and a blue dotted moon on sand")
            run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            outputs = _output_panel()
    fields = len(generate_tab.SLOT_FIELDS)
    regions = [slot_inputs[k * fields + generate_tab.SLOT_FIELDS.index("region")] for k in range(n_slots)]
    _follow_output_shape(demo, n_slots, settings[4], settings[5], canvases, regions, boxes)
    on_generate = _generate_handler(handle, segmenter, kept, jobs, n_slots)
    run_btn.click(on_generate, [count, prompt] + settings + slot_inputs, outputs[:5] + [matting_status, outputs[5]],
                  show_progress="hidden")
    ex_inputs = [prompt] + [slot_inputs[k * fields] for k in range(n_slots)] + [slot_inputs[1], settings[1], count]
    for rows, label, elem in ((EXAMPLES, EXAMPLES_LABEL, "examples"),
                              (PHOTO_EXAMPLES, _photo_examples_label(handle.kind), "photo-examples")):
        gr.Examples(examples=[[row[6]] + row[2: 2 + n_slots] + [row[1], row[7], row[0]] for row in rows
                              if row[0] <= n_slots], inputs=ex_inputs, label=label, elem_id=elem)
    return on_generate


def _photo_examples_label(kind: str) -> str:
    """Said in the UI, not only in the docs: the miniature was trained on its synthetic world alone."""
    label = "Photo examples (public-domain / CC0 photos from scikit-image)"
    if kind in ("sdxl", "flux"):
        return label
    return label + (f": these need SDXL or FLUX weights - the model running now ({kind}) knows only the synthetic "
                    "world and turns a photo into one of its own shapes in the photo's colours")


def _output_panel() -> list:
    """[gallery, info, routing, legend, files, progress]: right under the Generate button."""
    run_progress = gr.HTML(elem_id="run-progress")
    gallery = gr.Gallery(label="Output", columns=2, object_fit="contain", format="png", height=280,
                         elem_id="output-gallery")
    info = gr.Markdown(elem_id="run-info")
    routing = gr.Gallery(label="Routing: all subjects, then each subject alone, then the map", columns=3,
                         object_fit="contain", format="png", elem_id="routing-gallery")
    legend = gr.HTML(elem_id="routing-legend")
    files = gr.File(label="Download (PNG)", file_count="multiple", interactive=False, elem_id="downloads")
    return [gallery, info, routing, legend, files, run_progress]


def _generate_handler(handle: ModelHandle, segmenter, kept: SessionFiles, jobs: SessionJobs, n_slots: int):
    """The Generate button's handler (a generator streaming the stage into #run-progress)."""
    @gpu
    def on_generate(request: gr.Request, c, prompt_text, negative_text, seed_v, steps_v, guidance_v, width_v,
                    height_v, num_v, background_v, background_start_v, *slot_values):
        """The session's job from the first line to the last (the queue admits no other meanwhile)."""
        cancel = jobs.start(request)
        try:
            yield from run_generate(request, cancel, c, prompt_text, negative_text, seed_v, steps_v, guidance_v,
                                    width_v, height_v, num_v, background_v, background_start_v, *slot_values)
        finally:  # done, failed, or closed by Gradio for a client that went away
            jobs.finish(request, cancel)

    def run_generate(request, cancel, c, prompt_text, negative_text, seed_v, steps_v, guidance_v, width_v, height_v,
                     num_v, background_v, background_start_v, *slot_values):
        kept.claim(request, background_v, *slot_values)
        try:
            slots = generate_tab.slots_from_values(slot_values)[: check_number(c or 1, "Subjects", 1, n_slots,
                                                                               integer=True)]
        except USER_ERRORS as e:
            yield _refuse(e, 7)
            return
        out_dir = kept.folder(request)

        def work(tracker):
            return generate_tab.run_generation(
                handle, StagedSegmenter(segmenter, tracker), slots, prompt_text, negative_text, seed_v, steps_v,
                guidance_v, width_v, height_v, num_v, progress=tracker.step, out_dir=out_dir, background=background_v,
                background_start=background_start_v)

        yield [gr.skip()] * 6 + [Status("starting", "", 0.0).html()]
        try:
            for item in follow(work, cancel):
                if isinstance(item, Status):
                    yield [gr.skip()] * 6 + [item.html()]
                else:
                    result = item[1]
        except Cancelled:  # the session ended: there is no one to tell
            return
        except Exception as e:  # the user's mistake or advice, else a bug: both keep earlier results
            told = _refuse(e, 6) if isinstance(e, USER_ERRORS) else _report_bug(e, 6)
            yield told + ['<div class="anystory-progress" data-stage="stopped">Stopped: nothing was '
                          "generated; earlier results are kept.</div>"]
            return
        # the galleries empty first: none of their thumbnails keeps a picture of the previous run while this one's load
        yield [], gr.skip(), [], "", gr.skip(), gr.skip(), gr.skip()
        yield (kept.as_files(request, captioned(result.images)), result.info + "  \n" + result.routing_note,
               kept.as_files(request, routing_items(result)), result.legend, result.files, segmenter.status, gr.skip())

    return on_generate


def _shot_table():
    """The shots, one row each, with its own "Add shot" / "Remove last shot" buttons: the table's columns are fixed
    (no column can be added or deleted), rows come and go only through the buttons' clear names."""
    n = len(storyboard_tab.SHOT_COLUMNS)
    # (n, "fixed"): the page's table then offers no column insert/delete (Gradio's column_limits is a no-op yet)
    shots = gr.Dataframe(headers=list(storyboard_tab.SHOT_COLUMNS), datatype=["str"] * n, column_count=(n, "fixed"),
                         value=[[""] * n for _ in range(3)], row_count=3,
                         label="Shots (characters: comma-separated aliases, optional; regions: optional, "
                               "'alias: x0, y0, x1, y1' in fractions of the frame, ';' between characters)",
                         interactive=True, elem_id="shots")
    with gr.Row():
        add = gr.Button("+ Add shot", size="sm", elem_id="add-shot")
        remove = gr.Button("- Remove last shot", size="sm", elem_id="remove-shot")
    add.click(storyboard_tab.add_shot, shots, shots, queue=False)
    remove.click(storyboard_tab.remove_shot, shots, shots, queue=False)
    return shots



def _story_settings(seed_v, steps_v, background_v=None, background_start_v=None) -> dict:
    """The form's story seed, steps and background as sent (the script's rules name a bad one); -1 is "random"."""
    return {"seed": None if random_seed(seed_v) else seed_v, "steps": steps_v, "background": background_v,
            "background_start": background_start_v}


def _story_form(d, kept: SessionFiles) -> SimpleNamespace:
    """The Storyboard tab's fields: characters, shots, title, seed, steps, buttons and what shows the results."""
    gr.Markdown("Characters once, then shots. Refer to a character in a prompt as `{alias}`: it is replaced by "
                "the description, and the character acts in that shot with its own reference. Leave a shot's "
                "*characters* empty to use those named in its prompt. One seed for the whole story keeps the "
                "characters consistent.")

    def on_reference(request: gr.Request, path):
        """A character's reference is the session's as soon as it is uploaded (deleted with the session)."""
        kept.claim(request, path)

    char_inputs = []
    for row in range(0, storyboard_tab.STORY_SLOTS, 3):
        with gr.Row():
            for i in range(row, min(row + 3, storyboard_tab.STORY_SLOTS)):
                with gr.Column(min_width=200):
                    alias = gr.Textbox(label=f"Character {i + 1}: alias", elem_id=f"char-{i + 1}-alias")
                    desc = gr.Textbox(label="Description", placeholder="e.g. a ginger cat")
                    ref = UploadImage(label="Reference", type="filepath", image_mode=None,
                                      sources=["upload", "clipboard"], height=160, elem_id=f"char-{i + 1}-ref")
                    ref.upload(on_reference, ref, None, queue=False, show_progress="hidden")
                    char_inputs += [alias, desc, ref]
    shots = _shot_table()
    with gr.Row():
        story_title = gr.Textbox(label="Title")
        story_seed = gr.Number(-1, label="Story seed (-1 = random, one seed for all shots)", precision=0,
                               minimum=-1, maximum=MAX_SEED)
        story_steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", info=SLIDER_HELP["story_steps"])
        raw_number(story_seed), raw_number(story_steps)
    story_bg, story_bg_start = _story_background(on_reference)
    with gr.Row():
        story_btn = gr.Button("Generate storyboard", variant="primary", elem_id="generate-storyboard")
        example_btn = gr.Button("Load the example story (references included)", elem_id="story-example")
        export_btn = gr.Button("Export script")
    with gr.Row():
        script_upload = gr.File(label="Import script (.yaml, .yml, .json, or a .zip bundle with images)",
                                file_types=[".yaml", ".yml", ".json", ".zip"], elem_id="import-script")
        script_files = gr.File(label="Exported script", file_count="multiple", interactive=False)
    story_status = gr.Markdown(elem_id="story-status")
    story_progress = gr.HTML(elem_id="story-progress")
    frames = gr.Gallery(label="Frames (captioned with their shot)", columns=3, object_fit="contain",
                        format="png", elem_id="story-frames")
    frame_routes = gr.Gallery(label="Routing per frame", columns=3, object_fit="contain", format="png",
                              elem_id="story-routes")
    story_legend = gr.HTML()
    return SimpleNamespace(char_inputs=char_inputs, shots=shots, title=story_title, seed=story_seed,
                           steps=story_steps, background=story_bg, background_start=story_bg_start,
                           run_btn=story_btn, example_btn=example_btn, export_btn=export_btn,
                           upload=script_upload, exported=script_files, status=story_status,
                           progress=story_progress, frames=frames, routes=frame_routes, legend=story_legend)


def _story_background(on_upload):
    """The whole story's background reference (a script's ``settings.background``; a shot's own stays in scripts)."""
    image, strength = background_controls("Background reference for every shot (optional, SDXL only)",
                                          "story-background", type="filepath")
    image.upload(on_upload, image, None, queue=False, show_progress="hidden")
    raw_number(strength)
    return image, strength


def _story_import(f: SimpleNamespace, kept: SessionFiles, d) -> None:
    """Import (an upload, or the shipped example) fills the form; what the page cannot use is named."""
    char_inputs = f.char_inputs

    def on_import(request: gr.Request, path):
        if not path:
            return [gr.update()] * (len(char_inputs) + 7)
        kept.claim(request, path)
        try:
            script, missing = import_script(path, kept.folder(request))
            values, rows = storyboard_tab.ui_from_script(script)
        except USER_ERRORS as e:
            return _refuse(e, len(char_inputs) + 7, "Import failed", status_at=-1)
        note = f"Imported '{script.title or os.path.basename(path)}': {len(script.characters)} characters, " \
               f"{len(script.shots)} shots."
        if missing:
            note += " Upload the reference image for: " + ", ".join(missing) + "."
        unused = storyboard_tab.unused_fields(script)
        if unused:
            note += (" This page has no field for, and will not use: " + ", ".join(unused[:12])
                     + (f" and {len(unused) - 12} more" if len(unused) > 12 else "") + ".")
        return values + [rows, script.title, script.settings.get("seed", -1),
                         script.settings.get("steps") or d.steps, script.settings.get("background"),
                         script.settings.get("background_start"), note]

    story_fields = char_inputs + [f.shots, f.title, f.seed, f.steps, f.background, f.background_start, f.status]
    f.upload.upload(on_import, f.upload, story_fields)
    # the shipped script is read where it lies, so its relative reference paths resolve (an upload of the
    # bare YAML cannot carry its images: that is what the exported .zip bundle is for)
    def on_example(request: gr.Request):
        return on_import(request, EXAMPLE_STORY)

    f.example_btn.click(on_example, None, story_fields)


def _story_export(f: SimpleNamespace, kept: SessionFiles) -> None:
    """Export: the form as script.yaml, script.json and a .zip bundle with the references."""
    def on_export(request: gr.Request, title, rows, seed_v, steps_v, background_v, background_start_v, *values):
        kept.claim(request, background_v, *values)
        try:
            script = storyboard_tab.script_from_ui(values, rows, title,
                                                   _story_settings(seed_v, steps_v, background_v, background_start_v))
            return storyboard_tab.export_script_files(script, kept.folder(request)), ""
        except USER_ERRORS as e:
            return _refuse(e, 2, "Cannot export", status_at=1)

    f.export_btn.click(on_export, _story_inputs(f), [f.exported, f.status])


def _story_inputs(f: SimpleNamespace) -> list:
    """What export and generate read from the form, in their handlers' order."""
    return [f.title, f.shots, f.seed, f.steps, f.background, f.background_start] + f.char_inputs


def _storyboard_handler(handle: ModelHandle, segmenter, kept: SessionFiles, jobs: SessionJobs):
    """The Generate storyboard button's handler: frames appear as they are made."""
    @gpu
    def on_storyboard(request: gr.Request, title, rows, seed_v, steps_v, background_v, background_start_v, *values):
        """A generator: frames appear as they are made, the stage and ETA stream into #story-progress. The
        session's job from the first line to the last."""
        cancel = jobs.start(request)
        try:
            yield from run_storyboard(request, cancel, title, rows, (seed_v, steps_v, background_v, background_start_v),
                                      *values)
        finally:
            jobs.finish(request, cancel)

    def run_storyboard(request, cancel, title, rows, form, *values):
        """``form``: the story's (seed, steps, background, background strength) as sent."""
        seed_v, steps_v, background_v, _ = form
        kept.claim(request, background_v, *values)
        shown, routes, legend_text = [], [], ""
        try:
            script = storyboard_tab.script_from_ui(values, rows, title, _story_settings(*form))
        except USER_ERRORS as e:
            yield _refuse(e, 5, "Cannot generate the storyboard", status_at=2)
            return
        made = []  # appended by the worker thread, read here
        out_dir = kept.folder(request)

        def work(tracker):
            tracker.label = f"frame 1/{len(script.shots)}"
            for frame in storyboard_run.storyboard_frames(
                    handle, StagedSegmenter(segmenter, tracker), script, seed_v, steps_v,
                    progress=tracker.step, out_dir=out_dir):
                made.append(frame)
                tracker.label = f"frame {min(len(made) + 1, len(script.shots))}/{len(script.shots)}"

        def new_frames():
            nonlocal legend_text
            while len(shown) < len(made):
                image, overlays = kept.as_files(request, frame_items(made[len(shown)]))
                shown.extend(image)
                routes.extend(overlays)
                legend_text = storyboard_run.story_legend(script)
            return f"{len(shown)} of {len(script.shots)} frames, seed {made[-1].seed}." if made else gr.skip()

        try:
            for item in follow(work, cancel):
                status = item.html() if isinstance(item, Status) else gr.skip()
                if len(shown) < len(made):
                    yield shown, routes, new_frames(), legend_text, status
                else:
                    yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), status
        except Cancelled:  # the session ended: there is no one to tell
            return
        except Exception as e:  # the user's mistake or advice, else a bug: both keep the frames made
            new_frames()
            told = (_refuse(e, 4, "Cannot generate the storyboard", status_at=2) if isinstance(e, USER_ERRORS)
                    else _report_bug(e, 4, status_at=2))
            stopped = '<div class="anystory-progress" data-stage="stopped">Stopped.</div>'
            if shown:
                yield shown, routes, f"Stopped after {len(shown)} frame(s): {e}", legend_text, stopped
                return
            yield told + [stopped]

    return on_storyboard


def _storyboard_tab(handle: ModelHandle, segmenter, kept: SessionFiles, jobs: SessionJobs):
    """Characters once, then shots; returns the heavy handler."""
    f = _story_form(handle.defaults, kept)
    _story_import(f, kept, handle.defaults)
    _story_export(f, kept)
    on_storyboard = _storyboard_handler(handle, segmenter, kept, jobs)
    f.run_btn.click(on_storyboard, _story_inputs(f),
                    [f.frames, f.routes, f.status, f.legend, f.progress], show_progress="hidden")
    return on_storyboard


def build_demo(handle: ModelHandle, segmenter: LazyBiRefNetSegmenter, out_root: str | None = None,
               kept: SessionFiles | None = None, jobs: SessionJobs | None = None) -> gr.Blocks:
    """The whole UI around an already loaded model. ``kept``: where each session's files go and when they are
    deleted (docs/privacy.md); ``jobs``: the cancel flags of each session's jobs."""
    kept = kept or SessionFiles(out_root or tempfile.mkdtemp(prefix="anystory_app_"))
    jobs = jobs or SessionJobs()
    n_slots = max(1, handle.max_subjects)
    d = handle.defaults

    # Gradio deletes its cache copies (outputs, uploads) older than the window, checked a few times per window
    with gr.Blocks(title="AnyStory", delete_cache=(max(1, min(60, kept.ttl // 4)), kept.ttl)) as demo:
        gr.Markdown("# AnyStory: several subjects, each from its own reference, in one picture\n"
                    "Upload a reference photo per subject, describe the scene, press **Generate**. The router decides "
                    "where each subject may act; the coloured overlay shows it (one colour per subject).")
        gr.Markdown(handle.status_markdown(), elem_id="model-status")
        matting_status = gr.Markdown(lambda: segmenter.status, elem_id="matting-status")  # per page load

        with gr.Tab("Generate"):
            on_generate = _generate_tab(demo, handle, segmenter, kept, jobs, matting_status)
        with gr.Tab("Storyboard"):
            on_storyboard = _storyboard_tab(handle, segmenter, kept, jobs)

        gr.Markdown(f"Uploads: PNG, JPEG, WebP, BMP or TIFF, at most {MAX_UPLOAD_MB} MB each. Subjects: at most "
                    f"{handle.max_subjects}. Masks from: uploaded or drawn, else automatic matting "
                    f"(BiRefNet `{BIREFNET_ID}` when it can be loaded). Privacy: your uploads and results are "
                    f"deleted when you close this page, and at the latest after {_duration(kept.ttl)}.")

        def on_unload(request: gr.Request):
            """The tab closed: stop the session's job within one step and delete every file it left."""
            jobs.cancel(request)
            kept.end(request)

        demo.unload(on_unload)
    demo.anystory_heavy = (on_generate, on_storyboard)  # at most one of these per session in the queue
    demo.anystory_files, demo.anystory_jobs = kept, jobs
    return demo


def _duration(seconds: int) -> str:
    return f"{seconds // 60} minutes" if seconds >= 120 else f"{seconds} seconds"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="AnyStory demo (Gradio)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=os.environ.get("ANYSTORY_MODEL", "auto"), choices=("auto",) + KINDS,
                   help="auto: FLUX if a big enough GPU and its weights are reachable, else SDXL AnyStory if its "
                        "weights are configured, else the miniature. tiny: untrained test pipeline")
    p.add_argument("--sdxl-weights", default=None, help="AnyStory SDXL weights folder (or ANYSTORY_SDXL_WEIGHTS)")
    p.add_argument("--sdxl-base", default=None, help="SDXL base, hub id or folder (or ANYSTORY_SDXL_BASE)")
    p.add_argument("--flux-weights", default=None, help="local anystory_flux.bin (or ANYSTORY_FLUX_WEIGHTS)")
    p.add_argument("--offload", action="store_true", help="CPU offload on CUDA (saves GPU memory, slower)")
    add_vram(p, os.environ.get("ANYSTORY_VRAM", "auto"))
    p.add_argument("--segmenter", default=BIREFNET_ID, help="matting model for subjects without a mask (hub id)")
    p.add_argument("--host", default=None, help="server address (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="server port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--auth", default=os.environ.get(AUTH_ENV) or None, metavar="USER:PASSWORD[,USER:PASSWORD]",
                   help=f"require a login (or {AUTH_ENV}, e.g. a Space secret); default: no login")
    p.add_argument("--retention", type=int, default=None, metavar="SECONDS",
                   help=f"delete uploads and results after this long at the latest (or {RETENTION_ENV}; default "
                        f"{DEFAULT_RETENTION_S}); they also go when the visitor's session ends")
    p.add_argument("--monitoring", action="store_true",
                   help="enable Gradio's /monitoring dashboard (off: anyone could read the traffic summary)")
    return p.parse_args(argv)


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """``user:password[,user:password]`` -> Gradio's list of pairs; None for no login."""
    if not text:
        return None
    pairs = []
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth / {AUTH_ENV} must read user:password (comma-separated for several users)")
        pairs.append((user, password))
    return pairs


def stop_on_signals() -> None:
    """SIGTERM (how services and containers stop a process) and SIGINT, even where a launch in the background left
    it ignored, end the app the way Ctrl-C does: Gradio closes the server and ``main`` deletes every visitor's files."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        ttl = retention_seconds(None if args.retention is None else str(args.retention))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = probe_environment(args.sdxl_weights, args.sdxl_base, args.flux_weights)
    env.flux_vram = args.vram
    try:
        handle = load_model(env, args.model)
    except (NoModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.offload and handle.device == "cuda" and hasattr(handle.pipe, "enable_model_cpu_offload"):
        handle.pipe.enable_model_cpu_offload()
    print(handle.status_markdown().replace("**", ""), flush=True)
    segmenter = LazyBiRefNetSegmenter(args.segmenter, device=handle.device)
    root = private_root()  # before the Blocks: Gradio's cache goes inside it
    anonymize_uploads()
    cache = os.environ["GRADIO_TEMP_DIR"]
    kept = SessionFiles(cache, cache, ttl)  # session folders inside the cache: served as they are, no copies
    kept.start_sweeper()
    stop_on_signals()
    try:
        demo = build_demo(handle, segmenter, kept=kept)
        demo.queue(default_concurrency_limit=1, max_size=32)
        one_job_per_session(demo, demo.anystory_heavy, demo.anystory_jobs)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                    max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[EXAMPLES_DIR], auth=auth,
                    enable_monitoring=args.monitoring)
    finally:  # nothing of any visitor outlives the app
        kept.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
