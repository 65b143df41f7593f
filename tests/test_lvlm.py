

@pytest.mark.slow
def test_report_command_scores_hemaclip_on_the_same_cells(sample, data_root: Path, tmp_path: Path, run_cli) -> None:
    """`hemaclip lvlm report` (the real CLI) with hemaclip describe on the run's own cells."""
    path, cells = sample
    behaviours = {c.image_sha1: Behaviour("correct", answer="neutrophil", justification="A small cell with no granules.",
                                          certainty=5) for c in cells}
    with ScriptedServer(behaviours) as server:
        run_lvlm(tmp_path / "run", server.url, "scripted", ["explain"], settings=FAST, sample_csv=path, data_root=data_root)
    result = run_cli("lvlm", "report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--n-boot", "50",
                     "--data", str(data_root))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    systems = metrics["protocols"]["explain"]["systems"]
    hem = [name for name in systems if name.startswith("hemaclip describe")]
    assert len(hem) == 1 and systems[hem[0]]["classification"]["n_scored"] == len(cells)
    lvlm = systems["scripted (run)"]["classification"]
    assert lvlm["answer_counts"]["neutrophil"] == len(cells) and lvlm["top2_answer_share"] == 1.0
    assert metrics["parser_validation"]["own_sentences"]["n"] == metrics["parser_validation"]["own_sentences"]["exact"]
    assert len(metrics["hemaclip_confidence"]) == 1 and len(metrics["hemaclip_faithfulness"]) == 1
