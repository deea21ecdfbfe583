"""Mask Batch node: several masks (any sizes) as one MASK batch, e.g. one per concept for
Multi-Concept Inversion."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from productscene.masks import stack_masks
from productscene.train.recipes.concepts import MAX_CONCEPTS


class ProductSceneMaskBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductSceneMaskBatch",
            display_name="Mask Batch (ProductScene)",
            category="ProductScene",
            description="Puts several masks into one MASK batch (resized to the first mask's size), in input order.",
            inputs=[io.Mask.Input("mask1", tooltip="The first mask (its size is the batch's size).")] + [
                io.Mask.Input(f"mask{i}", optional=True, tooltip=f"Mask {i} (optional; resized to mask1's size).")
                for i in range(2, MAX_CONCEPTS + 1)],
            outputs=[io.Mask.Output(display_name="MASK", tooltip="The masks as one batch, mask1 first.")],
        )

    @classmethod
    def execute(cls, mask1, **more) -> io.NodeOutput:
        return io.NodeOutput(stack_masks([mask1] + [more.get(f"mask{i}") for i in range(2, MAX_CONCEPTS + 1)]))


NODES = [ProductSceneMaskBatch]
