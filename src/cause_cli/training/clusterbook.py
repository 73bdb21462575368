"""Step one: the concept clusterbook ``M [K, D]``, by maximising the modularity of the
backbone tokens' graph (METHOD.md section 1)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..model.modularity import ModularityObjective
from ..trained import save_clusterbook
from .context import TrainingContext


def train_clusterbook(context: TrainingContext, title: str) -> None:
    """Step one: learn ``M [K, D]`` by maximising the modularity of the token graph."""
    config = context.config
    size = config.clusterbook_size
    clusterbook = torch.nn.Parameter(torch.empty(size, context.backbone.dim, device=context.device))
    torch.nn.init.uniform_(clusterbook, -1.0 / size, 1.0 / size)
    objective = context.group.parallel(
        ModularityObjective([clusterbook], config.modularity_temperature), context.device
    )
    optimiser = torch.optim.Adam([clusterbook], lr=config.learning_rate)

    def restore(state: dict[str, Any]) -> None:
        with torch.no_grad():
            clusterbook.copy_(state["clusterbook"])
        optimiser.load_state_dict(state["optimiser"])

    context.restore("clusterbook", restore)
    last_loss = torch.tensor(math.nan, device=context.device)
    for tokens, _ in context.training_batches(context.epochs(config.epochs_clusterbook), title):
        (sampled,) = context.grid_sample(tokens)
        loss = objective(sampled)[0] * context.batch_share()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        last_loss = loss.detach()
        context.checkpoint(
            "clusterbook", lambda: {"clusterbook": clusterbook.detach(), "optimiser": optimiser.state_dict()}
        )
    context.run.log(f"clusterbook: last modularity loss {context.global_loss_value(last_loss):.5f}")
    save_clusterbook(context.run, clusterbook)
