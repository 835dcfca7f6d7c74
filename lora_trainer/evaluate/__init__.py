"""The evaluation stage: what a trained LoRA does.

- `sample`: images at several strengths, as a labelled grid;
- `score`: the strength chosen by CLIP against the training images and the prompt;
- `loss_plot`: the loss curve as a picture (the tab, the ComfyUI node).
- `report`: a run's report.html and the compare.html of several runs, pages that open from disk.
"""
