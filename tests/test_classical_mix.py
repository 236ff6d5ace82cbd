"""bench/classical_mix.py reads chinese-poetry's collections: the text under their text keys at any
depth, never titles or authors, and the Tang poems joined line by line."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import classical_mix  # noqa: E402


def test_collections_give_their_text_and_no_titles(tmp_path):
    def write(path, data):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    write("lunyu/lunyu.json", [{"chapter": "学而篇", "paragraphs": ["子曰：学而时习之，不亦说乎？"]}])
    write("mengxue/guwenguanzhi.json", {"title": "古文观止", "abstract": ["选本，清代吴楚材编选的古文"],
                                        "content": [{"title": "郑伯克段于鄢", "content": [
                                            {"chapter": "左传", "paragraphs": ["初，郑武公娶于申，曰武姜。"]}]}]})
    write("json/poet.tang.0.json", [{"author": "李白", "title": "静夜思",
                                     "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]}])
    assert classical_mix.classical_texts(tmp_path) == [
        "子曰：学而时习之，不亦说乎？", "初，郑武公娶于申，曰武姜。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]
