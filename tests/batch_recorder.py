"""A LightningModule for data tests: it trains nothing useful and keeps every batch its training
steps received, as they received them (after the transfer hooks)."""

import lightning as L
import torch


class BatchRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return self.weight * batch.images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
