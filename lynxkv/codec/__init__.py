"""The pure codec: numpy arrays and bytes in, numpy arrays and bytes out.

No I/O, asyncio, aiohttp, lmdb or cupy here: this is the reference every GPU kernel
is tested against, and what the server uses to validate uploads.
"""

from lynxkv.codec.container import FORMAT_VERSION, Header, SectionRef, parse_header
from lynxkv.codec.decoder import ObjectDecoder, Section
from lynxkv.codec.kv import DecodedObject, LayerAssembler, decode, encode, encode_chunks
from lynxkv.codec.spec import CODECS, CodecSpec, get_codec

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "CodecSpec",
    "DecodedObject",
    "Header",
    "LayerAssembler",
    "ObjectDecoder",
    "Section",
    "SectionRef",
    "decode",
    "encode",
    "encode_chunks",
    "get_codec",
    "parse_header",
]
