"""AnyStory demo: several subjects from reference photos in one image, and storyboards (``python app.py``).

This file only wires Gradio components to functions in ``anystory.app_logic`` / ``anystory.app_inputs`` /
``anystory.storyboard``; those hold the logic and are what the tests call.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import gradio as gr

from anystory import app_logic as logic
from anystory.app_inputs import MAX_UPLOAD_MB, MAX_SEED, InputError
from anystory.matting import BIREFNET_ID, LazyBiRefNetSegmenter
from anystory.storyboard import ScriptError, import_script

try:  # Hugging Face Spaces (ZeroGPU): ask for a GPU only while generating
    import spaces

    gpu = spaces.GPU(duration=180)
except ImportError:
    def gpu(fn):
        return fn

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "examples")
USER_ERRORS = (InputError, ScriptError, logic.GenerationError)


def _ex(name):
    return os.path.join(EXAMPLES_DIR, name)


def _refuse(error: Exception, n_outputs: int, title: str = "Cannot generate"):
    """Show the problem and leave every output as it was (a raised gr.Error would cover earlier results)."""
    gr.Warning(str(error), title=title, duration=None)
    return gr.skip() if n_outputs == 1 else [gr.skip()] * n_outputs


def build_demo(handle: logic.ModelHandle, segmenter: LazyBiRefNetSegmenter, out_root: str | None = None) -> gr.Blocks:
    """The whole UI around an already loaded model."""
    out_root = out_root or tempfile.mkdtemp(prefix="anystory_app_")
    n_slots = max(1, handle.max_subjects)
    d = handle.defaults

    with gr.Blocks(title="AnyStory") as demo:
        gr.Markdown("# AnyStory: several subjects, each from its own reference, in one picture\n"
                    "Upload a reference photo per subject, describe the scene, press **Generate**. The router decides "
                    "where each subject may act; the coloured overlay shows it (one colour per subject).")
        gr.Markdown(handle.status_markdown(), elem_id="model-status")
        matting_status = gr.Markdown(segmenter.status, elem_id="matting-status")

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    count = gr.State(min(2, n_slots))
                    groups, slot_inputs = [], []
                    for i in range(n_slots):
                        with gr.Group(visible=i < min(2, n_slots)) as group:
                            with gr.Row():
                                image = gr.Image(label=f"Subject {i + 1}: reference image", type="filepath",
                                                 image_mode=None, sources=["upload", "clipboard"], height=220,
                                                 elem_id=f"subject-{i + 1}-image")
                                with gr.Column():
                                    name = gr.Textbox(label="Name", placeholder=f"subject {i + 1}",
                                                      elem_id=f"subject-{i + 1}-name")
                                    scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Semantic strength")
                                    ref_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Detail strength")
                            with gr.Accordion("Mask (optional: upload one or draw over the subject)", open=False):
                                with gr.Tab("Upload"):
                                    mask = gr.Image(label="Mask (white = subject, same size as the image)",
                                                    type="filepath", image_mode=None, sources=["upload"], height=200)
                                with gr.Tab("Draw"):
                                    drawn = gr.ImageEditor(label="Paint over the subject", type="pil",
                                                           sources=[], layers=False, height=260,
                                                           brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"))
                            image.change(lambda p: {"background": p, "layers": [], "composite": p} if p else None,
                                         image, drawn, queue=False)
                        groups.append(group)
                        slot_inputs += [image, mask, drawn, name, scale, ref_scale]
                    with gr.Row():
                        add_btn = gr.Button("+ Add subject", size="sm", elem_id="add-subject")
                        remove_btn = gr.Button("- Remove last subject", size="sm", elem_id="remove-subject")

                    def _resize(c, delta):
                        c = max(1, min(n_slots, c + delta))
                        return [c] + [gr.Group(visible=i < c) for i in range(n_slots)]

                    add_btn.click(lambda c: _resize(c, 1), count, [count] + groups, queue=False)
                    remove_btn.click(lambda c: _resize(c, -1), count, [count] + groups, queue=False)

                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                        placeholder="e.g. a red striped star and a blue dotted moon on sand")
                    negative = gr.Textbox(label="Negative prompt", lines=1)
                    with gr.Accordion("Settings", open=False):
                        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, minimum=-1, maximum=MAX_SEED)
                        steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps")
                        guidance = gr.Slider(0.0, 15.0, value=d.guidance, step=0.1, label="Guidance")
                        width = gr.Slider(d.min_size, d.max_size, value=d.size, step=d.size_step, label="Width")
                        height = gr.Slider(d.min_size, d.max_size, value=d.size, step=d.size_step, label="Height")
                        num_images = gr.Slider(1, 4, value=1, step=1, label="Images")
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Output", columns=2, height=300, elem_id="output-gallery")
                    info = gr.Markdown(elem_id="run-info")
                    routing = gr.Gallery(label="Routing: where each subject acts (overlay, map)", columns=2,
                                         height=300, elem_id="routing-gallery")
                    legend = gr.HTML(elem_id="routing-legend")
                    files = gr.File(label="Download (PNG)", file_count="multiple", interactive=False, elem_id="downloads")

            @gpu
            def on_generate(c, prompt_text, negative_text, seed_v, steps_v, guidance_v, width_v, height_v, num_v,
                            *slot_values, progress=gr.Progress()):
                slots = logic.slots_from_values(slot_values)[: int(c)]
                try:
                    result = logic.run_generation(
                        handle, segmenter, slots, prompt_text, negative_text, seed_v, steps_v, guidance_v, width_v,
                        height_v, num_v, progress=lambda i, n: progress((i, n), desc="denoising"),
                        out_dir=tempfile.mkdtemp(dir=out_root))
                except USER_ERRORS as e:
                    return _refuse(e, 6)
                shown = [(im, "route overlay") for im in result.overlays] + [(m, "route map") for m in result.route_maps]
                return (result.images, result.info + "  \n" + result.routing_note, shown, result.legend, result.files,
                        segmenter.status)

            run_btn.click(on_generate, [count, prompt, negative, seed, steps, guidance, width, height, num_images]
                          + slot_inputs, [gallery, info, routing, legend, files, matting_status])
            fields = len(logic.SLOT_FIELDS)
            second = slot_inputs[fields] if n_slots > 1 else slot_inputs[0]
            gr.Examples(
                examples=[
                    [_ex("red_striped_star.png"), None, _ex("blue_dotted_moon.png"),
                     "a red striped star and a blue dotted moon on sand"],
                    [_ex("green_checkered_square.png"), _ex("green_checkered_square_mask.png"),
                     _ex("red_striped_star.png"), "a green checkered square and a red striped star on snow"],
                    [_ex("astronaut.png"), None, _ex("cat.png"), "an astronaut holding a cat in a garden"],
                    [_ex("cat.png"), None, _ex("coffee.png"), "a cat next to a cup of coffee on a wooden table"],
                ],
                inputs=[slot_inputs[0], slot_inputs[1], second, prompt],
                label="Examples (synthetic subjects of the miniature's world; public-domain / CC0 photos from "
                      "scikit-image)")

        with gr.Tab("Storyboard"):
            gr.Markdown("Characters once, then shots. Refer to a character in a prompt as `{alias}`: it is replaced by "
                        "the description, and the character acts in that shot with its own reference. Leave a shot's "
                        "*characters* empty to use those named in its prompt. One seed for the whole story keeps the "
                        "characters consistent.")
            char_inputs = []
            for row in range(0, logic.STORY_SLOTS, 3):
                with gr.Row():
                    for i in range(row, min(row + 3, logic.STORY_SLOTS)):
                        with gr.Column(min_width=200):
                            alias = gr.Textbox(label=f"Character {i + 1}: alias", elem_id=f"char-{i + 1}-alias")
                            desc = gr.Textbox(label="Description", placeholder="e.g. a ginger cat")
                            ref = gr.Image(label="Reference", type="filepath", image_mode=None,
                                           sources=["upload", "clipboard"], height=160, elem_id=f"char-{i + 1}-ref")
                            char_inputs += [alias, desc, ref]
            shots = gr.Dataframe(headers=["prompt", "characters"], datatype=["str", "str"], column_count=2,
                                 row_count=3, label="Shots (characters: comma-separated aliases, optional)",
                                 interactive=True, elem_id="shots")
            with gr.Row():
                story_title = gr.Textbox(label="Title")
                story_seed = gr.Number(-1, label="Story seed (-1 = random, one seed for all shots)", precision=0,
                                       minimum=-1, maximum=MAX_SEED)
                story_steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps")
            with gr.Row():
                story_btn = gr.Button("Generate storyboard", variant="primary", elem_id="generate-storyboard")
                export_btn = gr.Button("Export script")
            with gr.Row():
                script_upload = gr.File(label="Import script (.yaml, .yml, .json, or a .zip bundle with images)",
                                        file_types=[".yaml", ".yml", ".json", ".zip"], elem_id="import-script")
                script_files = gr.File(label="Exported script", file_count="multiple", interactive=False)
            story_status = gr.Markdown(elem_id="story-status")
            frames = gr.Gallery(label="Frames", columns=3, height=360, elem_id="story-frames")
            frame_routes = gr.Gallery(label="Routing per frame", columns=3, height=240)
            story_legend = gr.HTML()

            def on_import(path):
                if not path:
                    return [gr.update()] * (len(char_inputs) + 5)
                try:
                    script, missing = import_script(path, tempfile.mkdtemp(dir=out_root))
                    values, rows = logic.ui_from_script(script)
                except USER_ERRORS as e:
                    return _refuse(e, len(char_inputs) + 5, "Import failed")
                note = f"Imported '{script.title or os.path.basename(path)}': {len(script.characters)} characters, " \
                       f"{len(script.shots)} shots."
                if missing:
                    note += " Upload the reference image for: " + ", ".join(missing) + "."
                return values + [rows, script.title, script.settings.get("seed", -1),
                                 script.settings.get("steps") or d.steps, note]

            script_upload.upload(on_import, script_upload,
                                 char_inputs + [shots, story_title, story_seed, story_steps, story_status])

            def _settings(seed_v, steps_v):
                return {"seed": int(seed_v) if seed_v is not None and seed_v >= 0 else None, "steps": steps_v}

            def on_export(title, rows, seed_v, steps_v, *values):
                try:
                    script = logic.script_from_ui(values, rows, title, _settings(seed_v, steps_v))
                    return logic.export_script_files(script, tempfile.mkdtemp(dir=out_root))
                except USER_ERRORS as e:
                    return _refuse(e, 1, "Cannot export")

            export_btn.click(on_export, [story_title, shots, story_seed, story_steps] + char_inputs, script_files)

            @gpu
            def on_storyboard(title, rows, seed_v, steps_v, *values, progress=gr.Progress()):
                shown, routes, legend_text = [], [], ""
                try:
                    script = logic.script_from_ui(values, rows, title, _settings(seed_v, steps_v))
                    frame_iter = logic.storyboard_frames(
                        handle, segmenter, script, seed_v, steps_v,
                        progress=lambda i, n: progress((i, n), desc="storyboard"), out_dir=tempfile.mkdtemp(dir=out_root))
                    for frame in frame_iter:
                        r = frame.output
                        shown.append((r.images[0], frame.caption))
                        routes += [(o, f"shot {frame.index + 1}") for o in r.overlays]
                        legend_text = logic.story_legend(script)
                        yield shown, routes, f"{len(shown)} of {len(script.shots)} frames, seed {frame.seed}.", legend_text
                except USER_ERRORS as e:
                    if shown:  # keep the frames already made
                        yield shown, routes, f"Stopped after {len(shown)} frame(s): {e}", legend_text
                        return
                    yield _refuse(e, 4)

            story_btn.click(on_storyboard, [story_title, shots, story_seed, story_steps] + char_inputs,
                            [frames, frame_routes, story_status, story_legend])

        gr.Markdown(f"Uploads: PNG, JPEG, WebP, BMP or TIFF, at most {MAX_UPLOAD_MB} MB each. Subjects: at most "
                    f"{handle.max_subjects}. Masks from: uploaded or drawn, else automatic matting "
                    f"(BiRefNet `{BIREFNET_ID}` when it can be loaded).")
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="AnyStory demo (Gradio)")
    p.add_argument("--model", default=os.environ.get("ANYSTORY_MODEL", "auto"), choices=("auto",) + logic.KINDS,
                   help="auto: FLUX if a big enough GPU and its weights are reachable, else SDXL AnyStory if its "
                        "weights are configured, else the miniature. tiny: untrained test pipeline")
    p.add_argument("--sdxl-weights", default=None, help="AnyStory SDXL weights folder (or ANYSTORY_SDXL_WEIGHTS)")
    p.add_argument("--sdxl-base", default=None, help="SDXL base, hub id or folder (or ANYSTORY_SDXL_BASE)")
    p.add_argument("--flux-weights", default=None, help="local anystory_flux.bin (or ANYSTORY_FLUX_WEIGHTS)")
    p.add_argument("--offload", action="store_true", help="CPU offload on CUDA (saves GPU memory, slower)")
    p.add_argument("--segmenter", default=BIREFNET_ID, help="matting model for subjects without a mask (hub id)")
    p.add_argument("--host", default=None, help="server address (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="server port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = logic.probe_environment(args.sdxl_weights, args.sdxl_base, args.flux_weights)
    try:
        handle = logic.load_model(env, args.model)
    except (logic.NoModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.offload and handle.device == "cuda" and hasattr(handle.pipe, "enable_model_cpu_offload"):
        handle.pipe.enable_model_cpu_offload()
    print(handle.status_markdown().replace("**", ""), flush=True)
    segmenter = LazyBiRefNetSegmenter(args.segmenter, device=handle.device)
    demo = build_demo(handle, segmenter)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[EXAMPLES_DIR])
    return 0


if __name__ == "__main__":
    sys.exit(main())
