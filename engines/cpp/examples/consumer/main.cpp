// rstr-plan BUNDLE: open (and verify) a bundle with the installed rstr_runtime and print its plan.
#include <rstr/runtime.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: rstr-plan BUNDLE\n");
    return 1;
  }
  try {
    const rstr::Bundle bundle = rstr::Bundle::open(argv[1]);
    const rstr::Manifest& m = bundle.manifest();
    std::printf("%s bundle, batch %lld, sample %s, %zu steps (%d guided)\n", m.family.c_str(),
                static_cast<long long>(m.batch), rstr::shape_string(m.sample.shape).c_str(), m.plan.steps.size(),
                m.plan.num_guided());
    for (const rstr::Step& s : m.plan.steps)
      std::printf("  step %d: t=%g %s\n", s.index, static_cast<double>(s.model_timestep),
                  s.kind == rstr::StepKind::Guided ? "guided" : "unguided");
    std::printf("tensorrt backend compiled: %s\n", rstr::backend_compiled(rstr::Backend::TensorRT) ? "yes" : "no");
  } catch (const rstr::Error& e) {
    std::fprintf(stderr, "rstr-plan: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
