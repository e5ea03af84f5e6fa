"""The pack's example workflows (1, 2 and 3 subjects with boxes), built here and written into
``comfyui_anystory/example_workflows/`` in ComfyUI's API format and UI (LiteGraph) format; and their tiny twins
for the server test, where stock loaders of full-size files give way to the ``tiny_nodes`` stand-ins.

    python tests/comfyui/example_workflows.py OBJECT_INFO.json   # rewrite the shipped files (UI needs /object_info)
"""
from __future__ import annotations

import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "comfyui_anystory", "example_workflows")
BOXES = {1: [(0.3, 0.1, 0.4, 0.85)],
         2: [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 0.5, 1.0)],
         3: [(0.0, 0.0, 0.34, 1.0), (0.33, 0.0, 0.34, 1.0), (0.66, 0.0, 0.34, 1.0)]}
PROMPTS = {1: "a photo of the subject walking on a beach at sunset",
           2: "two friends sitting side by side on a park bench, autumn",
           3: "three companions standing together in front of a castle, storybook illustration"}
SUBSTITUTES = {"UNETLoader": "TinyFluxUNETLoader", "CLIPVisionLoader": "TinyCLIPVisionLoader",
               "StyleModelLoader": "TinyStyleModelLoader"}


def name(n: int) -> str:
    return f"anystory_flux_{n}_subject{'s' if n > 1 else ''}"


def api_workflow(n: int) -> dict:
    """``n`` subjects, each from a photo (its alpha as the subject mask) with a box in the output."""
    g = {
        "1": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        "2": ("DualCLIPLoader", {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
                                 "type": "flux", "device": "default"}),
        "3": ("CLIPTextEncode", {"text": PROMPTS[n], "clip": ["2", 0]}),
        "4": ("FluxGuidance", {"conditioning": ["3", 0], "guidance": 3.5}),
        "5": ("ConditioningZeroOut", {"conditioning": ["3", 0]}),
        "6": ("VAELoader", {"vae_name": "ae.safetensors"}),
        "7": ("CLIPVisionLoader", {"clip_name": "sigclip_vision_patch14_384.safetensors"}),
        "8": ("StyleModelLoader", {"style_model_name": "flux1-redux-dev.safetensors"}),
        "9": ("AnyStoryLoader", {"anystory_name": "anystory_flux.bin", "clip_vision": ["7", 0], "style_model": ["8", 0]}),
    }
    for i, (x, y, w, h) in enumerate(BOXES[n], start=1):
        g[f"1{i}"] = ("LoadImage", {"image": f"anystory_subject_{i}.png"})
        g[f"2{i}"] = ("InvertMask", {"mask": [f"1{i}", 1]})
        inputs = {"anystory": ["9", 0], "vae": ["6", 0], "image": [f"1{i}", 0], "strength": 1.0,
                  "reference_strength": 1.0, "box_x": x, "box_y": y, "box_width": w, "box_height": h,
                  "reference_size": 512, "subject_mask": [f"2{i}", 0]}
        if i > 1:
            inputs["subjects"] = [f"3{i - 1}", 0]
        g[f"3{i}"] = ("AnyStorySubject", inputs)
    g.update({
        "40": ("AnyStoryApply", {"model": ["1", 0], "anystory": ["9", 0], "subjects": [f"3{n}", 0],
                                 "use_router": "auto", "redux_scale": 0.6, "redux_start": 0.1, "redux_end": 0.3,
                                 "ref_start": -1.0, "ref_end": 1.0}),
        "41": ("EmptySD3LatentImage", {"width": 512 * min(n, 2), "height": 512, "batch_size": 1}),
        "42": ("KSampler", {"model": ["40", 0], "seed": 42, "steps": 25, "cfg": 1.0, "sampler_name": "euler",
                            "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0],
                            "latent_image": ["41", 0], "denoise": 1.0}),
        "43": ("VAEDecode", {"samples": ["42", 0], "vae": ["6", 0]}),
        "44": ("SaveImage", {"images": ["43", 0], "filename_prefix": f"AnyStory_{n}"}),
        "45": ("AnyStoryRoutingMaps", {"model": ["40", 0], "samples": ["42", 0]}),
        "46": ("SaveImage", {"images": ["45", 1], "filename_prefix": f"AnyStory_{n}_routing"}),
    })
    return {k: {"class_type": c, "inputs": i, "_meta": {"title": c}} for k, (c, i) in g.items()}


def tiny_workflow(api: dict, size: int = 64, steps: int = 3, reference_size: int = 32) -> dict:
    """The same graph on the tiny files: stand-in loaders, a CONDITIONING without T5, the taef1 VAE, small sizes,
    and a check that every saved image is finite."""
    g = copy.deepcopy(api)
    for node in list(g):
        c, inputs = g[node]["class_type"], g[node]["inputs"]
        if c in SUBSTITUTES:
            g[node]["class_type"] = SUBSTITUTES[c]
        if c == "UNETLoader":
            inputs["unet_name"] = "tiny_flux.safetensors"
        elif c == "CLIPVisionLoader":
            inputs["clip_name"] = "tiny_siglip.safetensors"
        elif c == "StyleModelLoader":
            inputs["style_model_name"] = "tiny_redux.safetensors"
        elif c == "DualCLIPLoader":
            del g[node]
        elif c == "CLIPTextEncode":
            g[node] = {"class_type": "TinyFluxConditioning", "inputs": {"text": inputs["text"]}}
        elif c == "VAELoader":
            inputs["vae_name"] = "taef1"
        elif c == "EmptySD3LatentImage":
            inputs.update(width=size * inputs["width"] // 512, height=size)
        elif c == "KSampler":
            inputs["steps"] = steps
        elif c == "AnyStorySubject":
            inputs["reference_size"] = reference_size
        elif c == "SaveImage":
            check = f"9{node}"
            g[check] = {"class_type": "TinyAssertFinite", "inputs": {"images": inputs["images"]}}
            inputs["images"] = [check, 0]
    return g


def ui_workflow(api: dict, object_info: dict) -> dict:
    """The API graph as the UI's LiteGraph JSON: widget values in each node's declared order, links numbered."""
    ids = {k: i for i, k in enumerate(api, start=1)}
    outputs = {k: [[] for _ in object_info[v["class_type"]]["output"]] for k, v in api.items()}
    links, laid_out = [], {}
    for k, v in api.items():
        info = object_info[v["class_type"]]
        required = info["input"].get("required", {})
        inputs, widgets = [], []
        for input_name, spec in {**required, **info["input"].get("optional", {})}.items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            value = v["inputs"].get(input_name)
            if isinstance(value, list):
                links.append([len(links) + 1, ids[value[0]], value[1], ids[k], len(inputs),
                              object_info[api[value[0]]["class_type"]]["output"][value[1]]])
                outputs[value[0]][value[1]].append(len(links))
                inputs.append({"name": input_name, "type": kind, "link": len(links)})
            elif isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets.append(value if value is not None else options.get("default"))
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            elif input_name in required:
                inputs.append({"name": input_name, "type": kind, "link": None})
        laid_out[k] = (inputs, widgets)
    nodes = []
    for order, (k, v) in enumerate(api.items()):
        info = object_info[v["class_type"]]
        outs = [{"name": out_name, "type": t, "links": outputs[k][i], "slot_index": i}
                for i, (t, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        nodes.append({"id": ids[k], "type": v["class_type"], "pos": [60 + 330 * (order % 6), 80 + 260 * (order // 6)],
                      "size": [300, 150], "flags": {}, "order": order, "mode": 0, "inputs": laid_out[k][0],
                      "outputs": outs, "properties": {"Node name for S&R": v["class_type"]},
                      "widgets_values": laid_out[k][1]})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def write(object_info: dict) -> None:
    os.makedirs(SHIPPED, exist_ok=True)
    for n in BOXES:
        api = api_workflow(n)
        for suffix, data in (("_api", api), ("", ui_workflow(api, object_info))):
            with open(os.path.join(SHIPPED, name(n) + suffix + ".json"), "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        write(json.load(f))
