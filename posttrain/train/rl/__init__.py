"""Reinforcement learning with verifiable rewards: rollouts, GRPO, PPO."""
