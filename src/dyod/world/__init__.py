"""The offline reference world: an emoji atlas (Noto Color Emoji), a captioned scene corpus, bundled custom
datasets, and a feature network for offline KID."""
