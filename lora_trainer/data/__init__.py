"""The data stage: a folder of images and captions → what a training step reads.

- `captions/`: caption files (metadata.csv, .jsonl, .txt) and the captioner that writes them;
- `images`: finding and decoding image files;
- `dataset`: the checked records, aspect buckets, crops, flips and caption handling per step;
- `latents`: the on-disk caches of VAE latents and text embeddings;
- `doctor/`: what is wrong with a folder before training, and the fix.
"""
