import torch
from ossrl.testing import random_model, tiny_config
from ossrl.engine.engine import RolloutEngine
from ossrl.engine.sampling import SamplingParams
from ossrl.model.lora import LoRAConfig, apply_lora
import ossrl.engine.slots as S

model = random_model(tiny_config(), seed=0, dtype=torch.bfloat16).cuda()
apply_lora(model, LoRAConfig(r=4, seed=0))
engine = RolloutEngine(model)
orig = S.SlotDecoder._runner
def runner(self, bucket, params):
    r = orig(self, bucket, params)
    print("runner", bucket, self.cuda_graphs, r is not None, self.graph_failures, flush=True)
    return r
S.SlotDecoder._runner = runner
out = engine.generate([[1, 2, 3, 4, 5], [7, 8, 9]], 4, SamplingParams(temperature=1.0, max_new_tokens=40, seed=3))
print("slots", type(engine._slots), engine._slots.cuda_graphs, engine._slots.graphs, engine._slots.graph_failures)
print([len(c.token_ids) for g in out for c in g], [c.finish_reason for g in out for c in g])
