"""Shared fixtures: tiny reference models built with transformers, placed in folders and in a local Hub cache;
and the test tiers (the `torch`, `mlx` and `slow` markers), all set here in `pytest_collection_modifyitems`.

Nothing here touches the network: HF_HUB_OFFLINE is set before huggingface_hub is imported, and every
checkpoint is made by the tests in the exact upstream layout (`save_pretrained`).
"""

from __future__ import annotations

import fnmatch
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dalle2_portable.backends import auto_backend, installed  # noqa: E402

BACKENDS = installed()
AUTO = auto_backend() if BACKENDS else None  # what backend="auto" (the CLI's default) runs on here


def backend_params():
    """Parametrise a test over the installed backends (a missing one is reported as a skip with its reason)."""
    return [pytest.param(name, marks=pytest.mark.skipif(name not in BACKENDS, reason=f"{name} not installed"))
            for name in ("torch", "mlx")]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test converts into its own cache and sees an empty Hub cache unless it builds one."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("DALLE2_CACHE", str(root / "dalle2"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny Karlo, tiny Karlo-variations (diffusers folders and our conversions) and a tiny CLIP (~4 s)."""
    from builders import write_clip_vocab, write_tiny_clip, write_tiny_karlo

    import dalle2_portable as d2

    root = tmp_path_factory.mktemp("cascade")
    vocab = write_clip_vocab(root / "vocab")
    out = {"karlo_src": write_tiny_karlo(root / "karlo", vocab),
           "iv_src": write_tiny_karlo(root / "iv", vocab, variations=True),
           "clip": write_tiny_clip(root / "clip", vocab)}
    for name in ("karlo", "iv"):
        out[name] = root / f"{name}_converted"
        d2.convert(str(out[f"{name}_src"]), str(out[name]))
    return out


def cli(*args, ok=True):
    """`dalle2 ARGS` in-process (click's runner, program name dalle2): exit 0 if ok, else a one-line
    `error: ...` with exit status 2 and no traceback. Returns click's Result (output, stdout, stderr)."""
    from click.testing import CliRunner

    from dalle2_portable.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], prog_name="dalle2")
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, \
            r.output
        assert "Traceback" not in r.output
    return r


def assert_close_to_scale(actual, expected, rel: float, what: str = ""):
    """max |actual - expected| <= rel * max |expected| (the brief's "of the output's scale")."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"
    return err / scale


def assert_one_step_agrees(make_bundle, loss_fn, inputs, micro_batches=None, frozen=()) -> None:
    """One AdamW step of `loss_fn` on `make_bundle(backend)` (the same weights on each backend) from the same
    inputs (or accumulated over `micro_batches` instead): the loss to 1e-5 relative and the updated weights to
    1e-4 (see below) on MLX and torch. eps 1e-4: tests/test_train_step.py says why element-wise AdamW
    comparisons need it."""
    from dalle2_portable.backends import get_backend
    from dalle2_portable.train.optim import AdamW

    after = {}
    for name in ("torch", "mlx"):
        b = get_backend(name)
        bundle = make_bundle(b)
        step = b.train_step(bundle, loss_fn, AdamW(lr=1e-3, eps=1e-4), frozen)
        loss = step(*inputs, lr=1e-3) if micro_batches is None else step.accumulate(micro_batches, lr=1e-3)
        after[name] = (loss, b.state_dict(bundle))
    assert abs(after["mlx"][0] - after["torch"][0]) <= 1e-5 * after["torch"][0]
    w_t, w_m = after["torch"][1], after["mlx"][1]
    # Of each tensor's scale, or of the step (lr) for a tensor still near zero (a zero-initialised bias). Elements
    # whose gradient is ~eps are the sensitive ones (the step's slope in g is lr / 4 eps there): measured
    # decoder / super-res <= 1e-5, CLIP's zero biases 2.6e-5 (2.6e-8 absolute).
    assert max(np.abs(w_m[k] - w_t[k]).max() / max(np.abs(w_t[k]).max(), 1e-3) for k in w_t) <= 1e-4


_PASSED = 0


def pytest_runtest_logreport(report):
    global _PASSED
    if report.when == "call" and report.passed:
        _PASSED += 1


def pytest_sessionfinish(session, exitstatus):
    """A run in which nothing passed (nothing collected, or everything skipped) is a failure, not a pass."""
    if exitstatus == 0 and _PASSED == 0:
        session.exitstatus = 1


# -- the test tiers ---------------------------------------------------------------------------------------------
# Backend markers: a test parametrised over `backend` (backend_params) is marked with that backend; one skipped
# unless both are installed (skipif reason "needs both backends ...") with both; RUNS_ON names the other tests
# that run on a backend ("first" = BACKENDS[0], "auto" = AUTO, "installed" = every installed backend).
RUNS_ON = {
    "test_backends.py::test_names_and_shapes_identical_across_backends_and_canonical": ("installed",),
    "test_backends.py::test_bad_backend_device_dtype_are_one_line": ("torch",),
    "test_cli_generate.py::test_generate_writes_pngs_with_metadata": ("torch",),
    "test_cli_generate.py::test_generate_single_image_and_bad_output": ("auto",),
    "test_cli_generate.py::test_generate_rerank_with_clip": ("auto",),
    "test_cli_generate.py::test_vary_edit_interpolate": ("auto",),
    "test_convert_clip.py::test_convert_dtype": ("torch",),
    "test_convert_clip.py::test_hub_cache_by_id_offline_then_cached": ("torch",),
    "test_convert_karlo.py::test_model_json_records_schedulers_tokenizer_and_defaults": ("first",),
    "test_convert_karlo.py::test_variations_pipeline": ("first",),
    "test_convert_karlo.py::test_hub_id_offline_converts_once_and_caches": ("first",),
    "test_convert_karlo.py::test_a_terminal_sees_a_progress_bar_over_every_source_byte": ("first",),
    "test_convert_karlo.py::test_model_directory_on_the_hub_downloads_what_its_model_json_names": ("first",),
    "test_convert_karlo.py::test_hub_downloads_are_pinned_and_bin_only_where_no_safetensors": ("first",),
    "test_sampling.py::test_models_are_well_conditioned": ("torch",),
    "test_sampling.py::test_draw_counts": ("torch",),
    "test_sampling.py::test_bad_input_is_one_line": ("torch",),
    "test_sampling.py::test_generate_needs_a_prior": ("torch",),
    "test_store.py::test_unknown_format": ("torch",),
    "test_store.py::test_not_a_model_directory": ("torch",),
    "test_store.py::test_missing_component_file": ("torch",),
    "test_store.py::test_missing_unexpected_misshaped_tensor": ("torch",),
    "test_store.py::test_validation_happens_before_allocation": ("torch",),
    # the reduced-precision checks of either backend compare with the PyTorch backend's float32 output
    "test_clip_parity.py::test_reduced_precision_against_fp32_reference": ("torch",),
    "test_prior_parity.py::test_reduced_precision_against_fp32": ("torch",),
    "test_text_proj_parity.py::test_reduced_precision_against_fp32": ("torch",),
    "test_unet_parity.py::test_reduced_precision_against_fp32": ("torch",),
    "test_modules.py::test_mx_compile_runs_the_tree": ("mlx",),
    "test_train_bf16.py::test_torch_device_without_bf16_is_one_line": ("torch",),
    "test_train_loop.py::test_sigkill_then_resume_is_bit_identical": ("first",),
    "test_train_loop.py::test_interrupted_checkpoint_write_keeps_the_previous": ("first",),
    "test_train_loop.py::test_bad_runs_are_one_line": ("first",),
    "test_train_decoder.py::test_fine_tuning_the_decoder_lowers_the_loss_and_decodes": ("first",),
    "test_train_clip.py::test_clip_from_scratch_learns_the_shapes": ("first",),
    "test_train_decoder.py::test_freeze_keeps_a_component_and_unknown_names_are_one_line": ("first",),
    "test_train_super_res.py::test_fine_tuning_lowers_the_loss_and_from_scratch_replaces_both_upsamplers":
        ("first",),
    "test_train_decoder.py::test_cli_trains_from_an_image_folder_and_reports_bad_records_in_one_line": ("first",),
    "test_data.py::test_cache_equals_clip_run_directly_and_is_reused": ("first",),
    "test_data.py::test_changing_the_data_or_the_clip_invalidates_the_cache": ("first",),
    "test_data.py::test_text_only_clip_caches_text_and_says_images_are_missing": ("first",),
    "test_data.py::test_an_interrupted_cache_leaves_no_file": ("first",),
    "test_default_model.py::test_a_flipped_byte_is_one_line_through_load_pipeline_and_generate": ("first", "auto"),
    "test_default_model.py::test_model_json_without_checksums_loads_and_record_adds_them": ("first",),
    "test_default_model.py::test_default_is_the_packaged_model": ("first", "auto"),
    "test_default_model.py::test_missing_default_is_one_line": ("first", "auto"),
    "test_store.py::test_bad_checksums_are_one_line": ("torch",),
    **{f"test_errors_model_dir.py::{t}": ("torch",) for t in (
        "test_a_weights_path_outside_the_directory_is_refused", "test_a_weights_path_of_the_wrong_type_is_one_line",
        "test_a_symlink_leading_out_is_refused", "test_a_tokenizer_leading_out_is_refused",
        "test_a_symlink_inside_the_directory_is_fine")},
    **{f"test_cli_options.py::{t}": ("torch",) for t in (
        "test_prompt_as_option_or_argument", "test_several_seeds_and_templates", "test_steps_and_guidance_shorthands",
        "test_threads_and_quiet_names", "test_diffusers_argument_names", "test_compare_takes_devices")},
    **{f"test_cli_reproduce.py::{t}": ("torch",) for t in (
        "test_image_k_of_a_set_regenerates_exactly", "test_a_reranked_pick_regenerates_exactly",
        "test_bad_uses_are_one_line")},
    "test_errors_sources.py::test_a_revision_with_a_local_folder_is_one_line": ("torch",),
    "test_errors_model_json.py::test_generated_model_json_documents_are_loaded_or_one_line": ("torch",),
    "test_errors_model_json.py::test_a_wrong_type_names_its_field": ("torch",),
    "test_errors_safetensors.py::test_messages_name_the_problem": ("torch",),
    "test_errors_model_json.py::test_ids_enums_and_offsets_may_be_zero": ("torch",),
    "test_errors_prompts.py::test_a_long_prompt_warns_and_records_what_was_used": ("torch",),
    "test_errors_prompts.py::test_the_cli_prints_one_warning_line_and_the_png_keeps_the_used_prompt": ("torch",),
    "test_errors_prompts.py::test_any_prompt_generates_or_is_one_line": ("torch",),
    "test_recipe.py::test_the_recipe_trains_resumes_and_packages": ("torch",),
    **{f"test_errors_numbers.py::{t}": ("torch",) for t in (
        "test_a_bad_seed_is_one_line_in_the_cli", "test_non_finite_guidance_in_the_cli",
        "test_a_stage_that_goes_non_finite_names_itself_and_saves_nothing",
        "test_steps_beyond_the_schedule_are_one_line", "test_steps_are_checked_before_any_weight_loads")},
    # quantising is MLX's (mx.quantize); a quantised model then loads on either backend
    **{f"test_quantize.py::{t}": ("mlx",) for t in (
        "test_a_quantised_component_follows_the_float_one", "test_the_stored_weights_are_what_mlx_dequantises",
        "test_the_quantised_directory_loads_and_generates", "test_low_memory_loads_quantised_components",
        "test_bfloat16_runs_a_quantised_model", "test_the_cli_quantizes_and_info_says_so")},
    **{f"test_quantize.py::{t}": ("installed",) for t in (
        "test_which_layers_are_quantised_follows_the_recorded_quantization", "test_bad_inputs_are_one_line",
        "test_a_bad_quantised_model_is_one_line")},
}

# The slow tier, as "file::test[params]" patterns (fnmatch): the whole-cascade checks beyond one generate per
# backend, the CLI's rerank / compare / image verbs, subprocess imports, and every float16 / bfloat16 check. The
# fast tier (`-m "not slow"`) keeps the float32 parity of every component against its reference (CLIP towers,
# prior, text_proj, decoder, super-res, scheduler), MLX vs PyTorch in float32, and generate against diffusers.
SLOW = (
    "test_modules.py::test_mx_compile_runs_the_tree",  # ~10 s of MLX compilation
    "test_train_decoder.py::test_fine_tuning_the_decoder_lowers_the_loss_and_decodes",  # the fast tier keeps
    "test_train_super_res.py::test_fine_tuning_lowers_the_loss_and_from_scratch_replaces_both_upsamplers",  # each
    "test_train_loop.py::test_checkpoint_resumes_on_the_other_backend",  # stage's five-step runs on both backends
    "test_train_clip.py::test_clip_from_scratch_learns_the_shapes",
    "test_train_karlo.py::test_fine_tuning_karlo_on_ten_pictures",
    "test_train_settings.py::test_previews_go_through_the_pipeline",
    "test_train_settings.py::test_from_run_json_reruns_the_run_bit_for_bit",
    "test_sampling.py::test_backends_agree*",
    "test_sampling.py::test_vary_matches_diffusers*",
    "test_sampling.py::test_rerank_scores_sorted_and_recomputable*",
    "test_sampling.py::test_interpolate_ends_and_edit_zero*",
    "test_sampling.py::test_models_are_well_conditioned",
    "test_cli_generate.py::test_generate_rerank_with_clip",
    "test_cli_generate.py::test_vary_edit_interpolate",
    "test_cli_generate.py::test_compare_table_image_and_exit_status",
    "test_backends.py::test_import_with_one_backend*",
    "test_train_loop.py::test_sigkill_then_resume_is_bit_identical",
    "test_train_decoder.py::test_cli_trains_from_an_image_folder_and_reports_bad_records_in_one_line",
    "test_train_loop.py::test_prior_loss_falls_and_the_result_generates[[]mlx]",  # [[] is a literal [
    "*::test_reduced_precision_against_fp32*",
    "test_train_bf16.py::test_bf16_step_follows_the_fp32_step*",  # and the other bfloat16 training checks
    "test_train_bf16.py::test_bf16_master_weights_stay_float32_over_steps*",
    "test_train_bf16.py::test_bf16_losses_agree_across_backends*",
    "*::test_mlx_matches_torch[*float16*",  # and bfloat16
    "test_default_model.py::test_the_wheel_ships_the_default_model",  # two wheel builds, ~6 s
    "test_errors_model_json.py::test_generated_model_json_documents_are_loaded_or_one_line",  # 100 documents, ~12 s
    "test_errors_safetensors.py::test_any_broken_weight_file_is_one_line*",  # 60 files per backend, ~13 s
    "test_errors_prompts.py::test_any_prompt_generates_or_is_one_line",  # 15 generations, ~10 s
    "test_recipe.py::test_the_recipe_trains_resumes_and_packages",  # every stage trained for 2 steps, ~60 s
    # real signals to real subprocesses (~4 s each), and whole generations through the CLI
    "test_errors_interrupts.py::test_a_caught_signal_leaves_nothing*",
    "test_errors_interrupts.py::test_sigkill_leaves_a_folder_the_next_run_sweeps",
    "test_errors_interrupts.py::test_cache_list_shows_and_clear_removes_leftovers",
    "test_cli_reproduce.py::test_image_k_of_a_set_regenerates_exactly",
    "test_cli_reproduce.py::test_a_reranked_pick_regenerates_exactly",
    "test_cli_reproduce.py::test_bad_uses_are_one_line",
    "test_cli_options.py::test_prompt_as_option_or_argument",
    "test_cli_options.py::test_several_seeds_and_templates",
    "test_cli_options.py::test_steps_and_guidance_shorthands",
    "test_cli_options.py::test_threads_and_quiet_names",
    "test_cli_options.py::test_compare_takes_devices",
    "test_errors_prompts.py::test_the_cli_prints_one_warning_line_and_the_png_keeps_the_used_prompt",
    "test_errors_numbers.py::test_a_stage_that_goes_non_finite_names_itself_and_saves_nothing",
    "test_errors_outputs.py::test_a_set_that_cannot_be_written_whole_is_not_written_at_all",  # 3 processes, ~10 s
    "test_errors_outputs.py::test_convert_and_the_cache_on_a_full_disk_leave_nothing",
)


_RESOLVE = {"first": set(BACKENDS[:1]), "auto": {AUTO} - {None}, "installed": set(BACKENDS)}


def _backends_of(item) -> set[str]:
    """The backends a test runs on (see RUNS_ON)."""
    callspec = getattr(item, "callspec", None)
    names = {callspec.params["backend"]} if callspec and "backend" in callspec.params else set()
    if any(str(m.kwargs.get("reason", "")).startswith("needs both backends") for m in item.iter_markers("skipif")):
        names |= {"torch", "mlx"}
    for name in RUNS_ON.get(f"{item.path.name}::{item.originalname}", ()):
        names |= _RESOLVE.get(name, {name})
    return names


def _check_tier_tables(items) -> None:
    """Every RUNS_ON / SLOW entry names a test its (collected) file defines, so a renamed test cannot silently
    leave its tier."""
    modules = {item.path.name: item.module for item in items if item.module is not None}
    for entry in (*RUNS_ON, *SLOW):
        file, test = entry.split("::")
        test = test.split("[")[0].rstrip("*")
        if file in modules and not hasattr(modules[file], test):
            raise pytest.UsageError(f"tests/conftest.py names {entry!r}, but {file} has no {test}; update it")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    _check_tier_tables(items)
    for item in items:
        for name in sorted(_backends_of(item)):
            item.add_marker(getattr(pytest.mark, name))
        if any(fnmatch.fnmatchcase(f"{item.path.name}::{item.name}", p) for p in SLOW):
            item.add_marker(pytest.mark.slow)
