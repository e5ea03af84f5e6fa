"""The Gradio demo's logic; ``app.py`` only wires it to components. One job per module:

- ``environment``: what the machine offers (GPU, reachable weights), probed without loading a model;
- ``models``: which model to run and why, loaded through :mod:`anystory.loading`;
- ``generation``: one request checked (the one rule for prompts and numbers) and run;
- ``generate_tab`` / ``storyboard_tab`` / ``storyboard_run``: each tab's values to and from the above;
- ``inputs``: uploads, masks, drawn masks and regions, checked; ``region_canvas``: the canvas regions are drawn on;
- ``storyboard``: scripts (YAML / JSON / bundles) and their shots; ``gallery`` / ``visualize``: what is shown;
- ``progress``, ``mask_preview``, ``upload_image``: the progress line, the mask preview, undecoded uploads;
- ``retention``: what a session leaves on disk, and when it is deleted (docs/privacy.md);
- ``jobs``, ``editor_limits``, ``raw_numbers``: one job per session, the work budget and cancellation; image
  editors checked before Gradio decodes them; form numbers checked by the app (docs/demo-hardening.md).
"""
