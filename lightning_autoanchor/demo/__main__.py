"""``python -m lightning_autoanchor.demo fit --config example_configs/demo.yaml``"""

from pytorch_lightning.cli import LightningCLI

from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo

if __name__ == "__main__":
    LightningCLI(TinyYolo, RenderedBoxesDataModule)
