"""blockprune.bench_timing.cpu_vector_isa: benchmark headers name the vector ISA, since two hosts
of one CPU name (EPYC Zen 3 / Zen 4) time onnxruntime's dense kernels differently. What can fail:
AVX-512 reported as AVX2 (the flag names share prefixes), a flag found in the field name."""

from blockprune.bench_timing import cpu_vector_isa


def test_the_widest_vector_extension_is_named_from_the_cpu_flags():
    zen3 = "flags\t\t: fpu sse sse2 avx fma avx2 bmi2"
    assert cpu_vector_isa(zen3) == "AVX2+FMA"
    assert cpu_vector_isa(zen3 + " avx512f avx512bw avx512vl") == "AVX-512"
    assert cpu_vector_isa("flags : fpu sse sse2 avx avx512_vnni_bogus") == "AVX"
    assert cpu_vector_isa("flags : fpu sse sse2 avx2") == "AVX2"
    assert cpu_vector_isa("flags : fpu sse sse2") == "SSE"
    assert cpu_vector_isa("flags : avx2") == "AVX2"  # the field name itself is not a flag
    assert isinstance(cpu_vector_isa(), str) and cpu_vector_isa()


def test_the_cpu_name_in_every_timing_header_carries_the_isa():
    """One model name ("AMD EPYC") covered an AVX2 and an AVX-512 host whose onnxruntime timings
    differ 1.9x; every benchmark that prints cpu_name() must say which it ran on."""
    from blockprune.bench_timing import cpu_name

    bare = cpu_name(with_isa=False)
    assert bare and cpu_name() == f"{bare} ({cpu_vector_isa()})"


def test_no_timing_benchmark_names_its_host_without_the_isa():
    """A benchmark that writes ``platform.processor()`` (or a bare model name) into its header
    hides which ISA produced its figures: every header goes through cpu_name()."""
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    offenders = [p.name for p in sorted(bench.glob("*.py"))
                 if "platform.processor()" in p.read_text() or "cpu_name(with_isa=False)" in p.read_text()]
    assert offenders == []
