"""Caption files: the seed metadata.csv, headers, quoting, jsonl, sidecars, precedence, encodings."""

from __future__ import annotations

import json

import pytest

from lora_trainer.data.captions import normalize_caption, read_captions, write_captions
from lora_trainer.errors import DatasetError


def _touch_images(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")  # read_captions only lists names; it never opens images


def test_seed_csv_unquoted_commas_belong_to_the_caption(tmp_path):
    (tmp_path / "metadata.csv").write_text(
        "img001.jpg,a caption, with its own commas\n"
        "img002.jpg,cyberpunk lab, neon lights, rain, night\n", encoding="utf-8")
    cs = read_captions(tmp_path)
    assert cs.captions == {"img001.jpg": "a caption, with its own commas",
                           "img002.jpg": "cyberpunk lab, neon lights, rain, night"}
    assert cs.problems == []
    assert cs.metadata_file == tmp_path / "metadata.csv"


@pytest.mark.parametrize("header", ["file_name,text", "file,caption", "image,caption", "File_Name,Text"])
def test_header_row_is_skipped(tmp_path, header):
    (tmp_path / "metadata.csv").write_text(f"{header}\na.png,ink-wash village, mist\n", encoding="utf-8")
    assert read_captions(tmp_path).captions == {"a.png": "ink-wash village, mist"}


def test_header_with_other_column_order_and_extra_columns(tmp_path):
    (tmp_path / "metadata.csv").write_text('text,file_name,score\n"rain, water village",a.png,5\n')
    assert read_captions(tmp_path).captions == {"a.png": "rain, water village"}


def test_quoted_fields_rfc4180(tmp_path):
    (tmp_path / "metadata.csv").write_text(
        'a.png,"a, b ""quoted"" c"\n'
        '"we,ird.png",plain\n'
        'b.png,"spans\ntwo lines"\n'
        'c.png,a "sign" saying open, neon\n', encoding="utf-8")
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": 'a, b "quoted" c', "we,ird.png": "plain", "b.png": "spans two lines",
                           "c.png": 'a "sign" saying open, neon'}


def test_blank_lines_bom_crlf_and_whitespace(tmp_path):
    data = "\ufeffa.png,  first  \r\n\r\n\nb.png,second\r\n   \n".encode()
    (tmp_path / "metadata.csv").write_bytes(data)
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "first", "b.png": "second"}
    assert cs.problems == []


def test_rows_without_caption_and_duplicates_are_reported_with_line_numbers(tmp_path):
    (tmp_path / "metadata.csv").write_text("a.png,one\nlonely.png\nb.png,two\na.png,three\n")
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "three", "b.png": "two"}
    lines = sorted(p.line for p in cs.problems)
    assert lines == [2, 4]
    assert "line 2" in str(next(p for p in cs.problems if p.line == 2))


def test_non_utf8_lines_are_decoded_and_reported(tmp_path):
    good = b"a.png,plain ascii\n"
    latin = "b.png,café au lait, style\n".encode("cp1252")
    (tmp_path / "metadata.csv").write_bytes(good + latin)
    cs = read_captions(tmp_path)
    assert cs.captions["b.png"] == "café au lait, style"
    assert [(p.line, "CP1252" in p.reason) for p in cs.problems] == [(2, True)]


def test_gbk_file_is_decoded_as_gbk(tmp_path):
    (tmp_path / "metadata.csv").write_bytes("a.png,岭南骑楼街, 水墨\nb.png,ascii\n".encode("gbk"))
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "岭南骑楼街, 水墨", "b.png": "ascii"}
    assert [p.line for p in cs.problems] == [1]


def test_utf16_with_bom(tmp_path):
    (tmp_path / "metadata.csv").write_bytes("a.png,notepad, unicode\n".encode("utf-16"))
    assert read_captions(tmp_path).captions == {"a.png": "notepad, unicode"}


def test_jsonl_with_aliases_and_bad_lines(tmp_path):
    rows = [{"file_name": "a.png", "text": "one"}, {"file": "b.png", "caption": "two"},
            {"image": "c.png", "text": ["tag1", "tag2"]}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n[1, 2]\n" + json.dumps({"file_name": "d.png"})
    (tmp_path / "metadata.jsonl").write_text(text, encoding="utf-8")
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "one", "b.png": "two", "c.png": "tag1, tag2"}
    assert sorted(p.line for p in cs.problems) == [4, 6, 7]


def test_txt_sidecars(tmp_path):
    _touch_images(tmp_path, "a.png", "b.JPG", "c.webp")
    (tmp_path / "a.txt").write_text("first\nsecond line\n")
    (tmp_path / "b.txt").write_bytes("\ufeffwith bom".encode())
    (tmp_path / "orphan.txt").write_text("no image")
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "first second line", "b.JPG": "with bom"}
    assert sorted(cs.from_sidecars) == ["a.png", "b.JPG"]


def test_custom_caption_extension(tmp_path):
    _touch_images(tmp_path, "a.png")
    (tmp_path / "a.caption").write_text("tagged")
    assert read_captions(tmp_path, caption_extension=".caption").captions == {"a.png": "tagged"}
    assert read_captions(tmp_path, caption_extension="caption").captions == {"a.png": "tagged"}


def test_precedence_metadata_path_then_csv_then_jsonl_then_sidecars(tmp_path):
    _touch_images(tmp_path, "a.png", "b.png", "c.png")
    (tmp_path / "a.txt").write_text("from txt a")
    (tmp_path / "c.txt").write_text("from txt c")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n")
    assert read_captions(tmp_path).captions == {"a.png": "from jsonl", "c.png": "from txt c"}

    (tmp_path / "metadata.csv").write_text("a.png,from csv\nb.png,from csv b\n")
    cs = read_captions(tmp_path)
    assert cs.captions == {"a.png": "from csv", "b.png": "from csv b", "c.png": "from txt c"}
    assert any("metadata.jsonl" in str(p) and "ignored" in str(p) for p in cs.problems)
    assert any("sidecar" in str(p) for p in cs.problems)  # a.txt is shadowed by the csv

    explicit = tmp_path / "elsewhere" / "mine.csv"
    explicit.parent.mkdir()
    explicit.write_text("a.png,explicit\n")
    cs = read_captions(tmp_path, metadata_path=explicit)
    assert cs.captions == {"a.png": "explicit", "c.png": "from txt c"}
    assert cs.metadata_file == explicit
    # a bare file name is looked up in the image folder
    assert read_captions(tmp_path, metadata_path="metadata.jsonl").captions["a.png"] == "from jsonl"


def test_missing_or_unsupported_metadata_path(tmp_path):
    with pytest.raises(DatasetError, match="metadata_path not found"):
        read_captions(tmp_path, metadata_path=tmp_path / "nope.csv")
    (tmp_path / "captions.xlsx").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"\.csv or \.jsonl"):
        read_captions(tmp_path, metadata_path=tmp_path / "captions.xlsx")


def test_caption_for_matches_other_spellings(tmp_path):
    (tmp_path / "metadata.csv").write_text("./sub/IMG1.PNG,one\n")
    cs = read_captions(tmp_path)
    assert cs.captions == {"sub/IMG1.PNG": "one"}
    assert cs.caption_for("img1.png") == "one"
    assert cs.caption_for("other.png") is None


TRICKY = {
    "a.png": "a caption, with its own commas",
    "b.png": '"quoted" at the start, then more',
    "c,comma.png": "name with a comma",
    "d.png": "",
    "e.png": "line one\nline two",
    "f.png": '  spaced  "inner" quotes ,, double commas ',
    "g.png": "unicode 岭南 café ✓",
}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_write_read_round_trip(tmp_path, fmt):
    written = write_captions(tmp_path, TRICKY, fmt=fmt)
    assert written == tmp_path / f"metadata.{fmt}"
    cs = read_captions(tmp_path)
    assert cs.captions == {k: normalize_caption(v) for k, v in TRICKY.items()}
    assert cs.problems == []
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_csv_is_written_in_the_seed_format(tmp_path):
    write_captions(tmp_path, {"img001.png": "a red circle on a teal background, flat style"})
    assert (tmp_path / "metadata.csv").read_text(encoding="utf-8") == (
        "img001.png,a red circle on a teal background, flat style\n")


def test_write_txt_sidecars_round_trip(tmp_path):
    _touch_images(tmp_path, "a.png", "b.png")
    assert write_captions(tmp_path, {"a.png": "one, two", "b.png": "three"}, fmt="txt") == tmp_path
    assert (tmp_path / "a.txt").read_text() == "one, two\n"
    assert read_captions(tmp_path).captions == {"a.png": "one, two", "b.png": "three"}


def test_write_to_explicit_path_and_refuse_bad_input(tmp_path):
    out = write_captions(tmp_path, {"a.png": "x"}, fmt="csv", path=tmp_path / "out" / "caps.csv")
    assert out.read_text() == "a.png,x\n"
    with pytest.raises(DatasetError, match="outside"):
        write_captions(tmp_path, {"../evil.png": "x"}, fmt="txt")
    with pytest.raises(DatasetError, match="format"):
        write_captions(tmp_path, {"a.png": "x"}, fmt="xml")
