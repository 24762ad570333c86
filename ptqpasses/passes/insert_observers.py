"""InsertObservers: put an observer after every node whose output Annotate marked observed."""

from __future__ import annotations

import torch.fx as fx

from ptqpasses import meta
from ptqpasses.meta import NodeQuant, Role
from ptqpasses.observers import make_observer
from ptqpasses.pipeline import Pass, register_pass


@register_pass
class InsertObservers(Pass):
    """Routes each observed value through an observer module (identity in the forward).

    Before::

        %relu = aten.relu(%conv)          # NodeQuant(fused, output=uint8 histogram)
        %pool = aten.max_pool2d(%relu, ...)

    After::

        %relu = aten.relu(%conv)
        %ptq_observer_3 = call_module[ptq_observer_3](%relu)   # meta: observes "relu"
        %pool = aten.max_pool2d(%ptq_observer_3, ...)
    """

    name = "insert-observers"

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        count = sum(1 for n in gm.graph.nodes if meta.observed_node(n) is not None)
        for node in list(gm.graph.nodes):
            q = meta.get_qspec(node)
            if q is None or q.output is None or node.op == "call_module":
                continue
            if any(meta.observed_node(u) == node.name for u in node.users):
                continue  # already observed (pass ran twice)
            name = f"ptq_observer_{count}"
            count += 1
            gm.add_submodule(name, make_observer(q.output, node.name))
            anchor = node
            if node.op == "placeholder":  # keep placeholders together at the top
                anchor = max((n for n in gm.graph.nodes if n.op == "placeholder"),
                             key=lambda n: list(gm.graph.nodes).index(n))
            with gm.graph.inserting_after(anchor):
                obs = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(obs, delete_user_cb=lambda u: u is not obs)
            meta.set_observed_node(obs, node.name)
            meta.set_qspec(obs, NodeQuant(Role.OBSERVER, output=q.output))
            meta.set_source(obs, meta.source(node))
            if "val" in node.meta:
                obs.meta["val"] = node.meta["val"]
            modified = True
        return modified
