"""The Gradio demo's logic (``app.py`` only wires it): models, generation, inputs, storyboard, visualisation."""
