"""Everything dpt_fast reads off an open_clip CLIP, in one place.

DPT inserts tokens between transformer layers, so it cannot call ``encode_image`` as one piece:
it runs the patch embedding, each residual block and the pooling head separately.

* :mod:`.blocks`: residual blocks recognised by structure (``nn.MultiheadAttention`` or open_clip's
  own ``Attention``), the layout each runs in, and what the fast model cannot decompose.
* :mod:`.towers`: the sizes of a supported CLIP and the tower pieces (embedding, blocks, heads),
  exactly as open_clip's ``VisionTransformer.forward`` and ``CLIP.encode_text`` compute them.
"""

from dpt_fast.clip_interop.blocks import (
    REFERENCE_HINT,
    BlockSpec,
    OpenClipModule,
    block_batch_first,
    block_spec,
    check_fast_block,
    run_block,
)
from dpt_fast.clip_interop.towers import (
    ClipGeometry,
    clip_geometry,
    compute_dtype,
    encode_text_tokens,
    text_head,
    text_positions,
    text_transformer,
    vision_embed,
    vision_head,
)

__all__ = [
    "REFERENCE_HINT", "BlockSpec", "ClipGeometry", "OpenClipModule", "block_batch_first",
    "block_spec",
    "check_fast_block", "clip_geometry", "compute_dtype", "encode_text_tokens", "run_block",
    "text_head", "text_positions", "text_transformer", "vision_embed", "vision_head",
]
