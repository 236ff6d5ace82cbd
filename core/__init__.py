"""
core: the machinery the commands share. 各个命令共用的部件。

The commands at the top of the repository (pretrain.py, sft.py, dpo.py, grpo.py, model_sample.py, serve.py,
eval.py, ...) are thin scripts over these modules; the model files (k_model.py, gpt2_model.py) and the
datasets (dataset.py) stay at the top, where happy-llm's readers look for them. Imports flow one way:
commands -> core -> model files, never back (tests/test_layout.py checks it).

    train_config.py   every setting of a run, as flags          训练配置：每个字段就是一个命令行参数
    trainer.py        the training loop, written once             训练循环（预训练、SFT、DPO、GRPO 共用）
    schedule.py       the LR schedule and the --time_limit plan   学习率调度与按时间规划步数
    loaders.py        the datasets of a run and their loaders     数据集划分、采样顺序与 DataLoader
    runtime.py        devices, DDP, mixed precision              设备、分布式、混合精度
    checkpoint.py     atomic checkpoints, resume, load_model      原子写入的检查点、续训、加载模型
    optim.py          AdamW, or Muon for the hidden matrices      优化器：AdamW 或 Muon
    lora.py           LoRA by hand, in peft's format              手写 LoRA（peft 格式保存）
    rewards.py        grpo.py's verifiable rewards and tasks      GRPO 的可验证奖励函数与算术题
    generation.py     KV cache, the decode loop                   KV 缓存、解码循环
    sampling.py       samplers, per-row settings as tensors       采样：每行自己的温度、top-k、top-p
    inference.py      a checkpoint with its tokenizer             检查点 + 分词器：续写与对话
    engine.py         continuous batching for serve.py            连续批处理（serve.py 的解码引擎）
    evaluation.py     BPC, multiple choice, generation checks     评测：BPC、选择题、生成诊断
    corpus.py         readers of every data format, the embedded corpus   各种数据格式的读取与内置语料
    llama_layout.py   our tensor names <-> transformers / llama.cpp       与 transformers / llama.cpp 的权重对应
    hf_llama.py       K-Model <-> transformers LlamaForCausalLM           与 transformers Llama 互相转换
    hf_common.py      what the transformers.Trainer recipes share         Trainer 版本共用的部分
    tracking.py       metrics.jsonl and SwanLab                           训练指标记录
    plotting.py       training curves to PNG                              训练曲线
"""
