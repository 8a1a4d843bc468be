"""The scenes benchmark: itmatch's own image-text matching data set, generated offline from a seed.

Pictures of 2-4 coloured shapes with scene graphs, captions written from explicit facts, the full
caption-image relevance, hard-negative twins and CNN region features in the SCAN precomp layout.
See docs/scenes.md.

    scene.py     scene graphs: objects, relations, twins
    render.py    pictures, masks, boxes
    grammar.py   captions from facts
    facts.py     fact evaluation and the relevance matrix
    features.py  region boxes and EfficientNet-Lite0 features
    generate.py  the folder: files, manifest, cache, `itmatch data scenes`
"""

from itmatch.data.scenes.generate import PRESETS, cmd_scenes, generate_scenes, preset_sizes

__all__ = ["PRESETS", "cmd_scenes", "generate_scenes", "preset_sizes"]
